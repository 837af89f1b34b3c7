"""RoPE in place: rotate the adjacent pairs of every head of each token by its position.

The angles' cosines and sines come from a float32 table built once per model from the same
float32 angles the torch twin uses (`positions * freqs`, Llama 3.1 scaling already in `freqs`), so
each pair sees the same complex product `(a c - b d, a d + b c)` computed in float32 and rounded
once to the model dtype. Torch twin: `nucleus.ops.torch.apply_rotary`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nucleus.kernels.triton import next_power_of_2

HEAD_BLOCK = 4  # heads per program: a token's Q and K heads spread over several programs


@triton.jit
def _rope_kernel(
    x_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_t,
    stride_h,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    d = tl.arange(0, HEAD_PAD)
    mask = (h[:, None] < HEADS) & (d[None, :] < HEAD_DIM)
    ptrs = x_ptr + t.to(tl.int64) * stride_t + h[:, None] * stride_h + d[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)  # whole rows: contiguous loads
    a, b = tl.split(tl.reshape(x.to(tl.float32), (HEAD_BLOCK, HEAD_PAD // 2, 2)))
    i = tl.arange(0, HEAD_PAD // 2)
    i_ok = i < HEAD_DIM // 2
    c = tl.load(cos_ptr + pos * (HEAD_DIM // 2) + i, mask=i_ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * (HEAD_DIM // 2) + i, mask=i_ok, other=0.0)[None, :]
    out = tl.join(a * c - b * s, a * s + b * c)  # (re, im) pairs back in place
    tl.store(ptrs, tl.reshape(out, (HEAD_BLOCK, HEAD_PAD)).to(x.dtype), mask=mask)


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate `x (T, heads, hd)` in place (rows may be strided; each head's values contiguous) by
    `positions (T,)`, with `cos`/`sin (max_position, hd/2)` float32 tables. Returns `x`."""
    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1:
        raise ValueError("rope_ needs each head's values contiguous")
    if tokens:
        grid = (tokens, triton.cdiv(heads, HEAD_BLOCK))
        _rope_kernel[grid](
            x, positions, cos, sin, x.stride(0), x.stride(1),
            HEADS=heads, HEAD_DIM=head_dim, HEAD_PAD=next_power_of_2(head_dim),
            HEAD_BLOCK=HEAD_BLOCK,
        )  # fmt: skip
    return x
