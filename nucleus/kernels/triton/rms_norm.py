"""RMSNorm, alone or fused with the residual add before it, one row per program.

Torch twin: `nucleus.ops.torch.TorchOps.rms_norm` / `add_rms_norm`. The rounding is the
reference's: the residual sum is rounded to the model dtype (as `x + h` is), the statistics are
float32, the normalised row is rounded to the model dtype before the weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nucleus.kernels.triton import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    eps,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < DIM
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:  # residual <- x + residual, rounded to the model dtype; normalise that
        x = (
            x.to(tl.float32)
            + tl.load(residual_ptr + row * stride_r + cols, mask=mask).to(tl.float32)
        ).to(x.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / DIM + eps)
    normed = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, add) -> torch.Tensor:
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    if x2.stride(1) != 1:
        raise ValueError("rms_norm needs rows with contiguous columns")
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    r2 = residual.view(-1, dim) if add else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, x2.stride(0), r2.stride(0), out.stride(0), eps,
            DIM=dim, BLOCK=next_power_of_2(dim), ADD=add,
        )  # fmt: skip
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`normalise(x) * weight` over the last dimension."""
    return _launch(x, None, weight, eps, add=False)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """`residual += x` (in place, in the model dtype), then `rms_norm(residual)`."""
    if not residual.is_contiguous() or residual.shape != x.shape:
        raise ValueError("the residual must be contiguous and shaped as x")
    return _launch(x, residual, weight, eps, add=True)
