"""The SwiGLU gate on a fused gate/up output: `silu(gate) * up`, one pass.

Torch twin: `nucleus.ops.torch.TorchOps.silu_mul`. Rounded as the reference rounds it: `silu` of
the gate rounded to the model dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + HIDDEN + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`(T, 2H)` holding `[gate | up]` per row -> `(T, H)`."""
    tokens, two_h = gate_up.shape
    hidden = two_h // 2
    if gate_up.stride(1) != 1:
        raise ValueError("silu_mul needs rows with contiguous columns")
    out = gate_up.new_empty(tokens, hidden)
    block = 1024
    if tokens:
        grid = (tokens, triton.cdiv(hidden, block))
        _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), hidden, block)
    return out
