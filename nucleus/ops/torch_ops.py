"""`TorchOps`: the model's elementwise ops in plain torch, with the reference's rounding.

These are the twins every kernel is tested against. In a bf16 model the rounding follows Meta's
`llama/model.py`: RMSNorm statistics in float32, the normalised row cast back to the model dtype
before the weight multiplies it; RoPE as a complex product in float32, cast back; `silu(gate)`
rounded before it multiplies `up`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class ModelOps:
    """What the model asks of its ops (`TorchOps` is the reference implementation).

    - `rms_norm(x, weight, eps)`;
    - `add_rms_norm(x, residual, weight, eps)`: `residual += x` in place (in the model dtype), then
      `rms_norm(residual, ...)`: the residual add of a block fused into the next norm;
    - `rope(freqs, positions)`: whatever `rotary` needs for this step's positions (built once per
      forward pass); `rotary(x (T, heads, hd), rope)`: RoPE on `x`, which may be a strided view
      into fused Q/K/V rows and may be rotated in place (callers pass a temporary);
    - `silu_mul(gate_up (T, 2H))`: `silu(gate) * up` of fused `[gate | up]` rows, `(T, H)`.
    """

    name = "abstract"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        raise NotImplementedError

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def rope(self, freqs: torch.Tensor, positions: torch.Tensor) -> Any:
        """complex64 `(T, hd/2)`: the reference's `freqs_cis` rows, `polar(1, pos * f)` from
        float32 angles."""
        angles = positions.float().unsqueeze(1) * freqs.float().unsqueeze(0)
        return torch.polar(torch.ones_like(angles), angles)

    def rotary(self, x: torch.Tensor, rope: Any) -> torch.Tensor:
        raise NotImplementedError

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs `(x[2i], x[2i+1])` of `x (T, heads, hd)` as complex numbers by
    `freqs_cis (T, hd/2)`, in float32: the reference's `apply_rotary_emb`."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(1)).flatten(-2).type_as(x)


class TorchOps(ModelOps):
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return normed.type_as(x) * weight

    def rotary(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, rope)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
