"""The model's hot elementwise ops, one implementation per kind of device, chosen once per model.

`Transformer.bind_kernels` (called by the loader and by the model runner) picks one `ModelOps`
for the model's device and dtype and hands it to every module that uses one; the model itself
never tests which it has. All implementations compute the same functions as `TorchOps`, the
reference's arithmetic, which the others are tested against:
- `TorchOps` (`torch_ops.py`): plain torch, any device;
- `CpuOps` (`cpu_ops.py`): the C kernels of `nucleus.kernels.cpu`, float32 on the CPU;
- `TritonOps` (`triton_ops.py`): the Triton kernels of `nucleus.kernels.triton`, on CUDA.
"""

from __future__ import annotations

import torch

from nucleus.ops.torch_ops import ModelOps, TorchOps

__all__ = ["ModelOps", "TorchOps", "select_ops"]


def select_ops(device: torch.device, dtype: torch.dtype, max_positions: int) -> ModelOps:
    """The fastest ops that serve tensors of `dtype` on `device`, for positions below
    `max_positions`."""
    from nucleus.kernels import cpu as cpu_kernels
    from nucleus.kernels.triton import triton_usable

    if device.type == "cuda" and triton_usable("cuda"):
        from nucleus.ops.triton_ops import TritonOps

        return TritonOps(max_positions)
    if device.type == "cpu" and dtype == torch.float32 and cpu_kernels.available():
        from nucleus.ops.cpu_ops import CpuOps

        return CpuOps()
    return TorchOps()
