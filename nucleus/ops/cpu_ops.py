"""`CpuOps`: the model's elementwise ops through the C kernels (float32 on the CPU).

Each is the `TorchOps` formula in one pass; only float32 summation order (the norm's mean) and
the rounding of RoPE's complex product (see `elementwise.c`) differ.
"""

from __future__ import annotations

import torch

from nucleus.kernels import cpu as cpu_kernels
from nucleus.ops.torch_ops import ModelOps


class CpuOps(ModelOps):
    name = "cpu"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return cpu_kernels.rms_norm(x.contiguous(), weight, eps)

    def rotary(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rotary_(x, rope)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.silu_mul(gate_up.contiguous())
