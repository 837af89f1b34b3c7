"""`TritonOps`: the model's elementwise ops through the Triton kernels (CUDA).

RoPE reads cosines and sines from float32 tables built once per frequency tensor, for every
position up to the model's context, so a step passes only its positions (no per-step table, and
nothing allocated inside a captured CUDA graph).
"""

from __future__ import annotations

import torch

from nucleus.kernels.triton import rms_norm as rms_norm_kernels
from nucleus.kernels.triton.rope import rope_
from nucleus.kernels.triton.silu_mul import silu_mul
from nucleus.ops.torch_ops import ModelOps

RopeTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # positions, cos, sin


class TritonOps(ModelOps):
    name = "triton"

    def __init__(self, max_positions: int = 8192) -> None:
        self.max_positions = max_positions
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_kernels.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return rms_norm_kernels.add_rms_norm(x, residual, weight, eps)

    def rope(self, freqs: torch.Tensor, positions: torch.Tensor) -> RopeTables:
        key = (freqs.data_ptr(), freqs.device)
        if key not in self._tables:
            # The torch twin's angles: float32 position times float32 frequency.
            angles = torch.arange(self.max_positions, device=freqs.device).float()[:, None]
            angles = angles * freqs.float()[None, :]
            self._tables[key] = (torch.cos(angles), torch.sin(angles))
        return (positions, *self._tables[key])

    def rotary(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        return rope_(x, *rope)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul(gate_up)
