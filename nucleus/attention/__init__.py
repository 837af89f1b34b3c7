"""Attention over the paged KV cache, through a backend chosen once per model runner.

One file per backend, all behind `AttentionBackend` (`base.py`):
- `reference.py`: Meta's arithmetic, every row padded to the step's longest (for `nucleus.Llama`'s
  seed-for-seed results, and the oracle of the others);
- `torch_sdpa.py`: the portable engine path (decode rows together, each prefill chunk alone,
  through torch SDPA);
- `cpu.py`: the C kernels, float32 on the CPU;
- `triton.py`: Triton kernels on CUDA, with a decode path a captured CUDA graph can replay.
"""

from __future__ import annotations

import torch

from nucleus.attention.base import AttentionBackend, KVCache
from nucleus.attention.reference import ReferenceBackend
from nucleus.attention.torch_sdpa import TorchBackend

__all__ = ["AttentionBackend", "KVCache", "ReferenceBackend", "TorchBackend", "select_backend"]


BACKENDS = ("reference", "torch", "cpu", "triton")


def select_backend(kv: KVCache, name: str = "auto", *, max_context: int = 8192) -> AttentionBackend:
    """The backend called `name` for a cache (one of `BACKENDS`), or with "auto" the fastest that
    serves the cache's device and dtype. `max_context`: the longest context a step may have."""
    from nucleus.kernels import cpu as cpu_kernels
    from nucleus.kernels.triton import triton_usable

    device, dtype = kv.k.device, kv.k.dtype
    if name == "auto":
        if device.type == "cuda" and triton_usable("cuda"):
            name = "triton"
        elif device.type == "cpu" and dtype == torch.float32 and cpu_kernels.available():
            name = "cpu"
        else:
            name = "torch"
    if name == "reference":
        return ReferenceBackend(kv)
    if name == "torch":
        return TorchBackend(kv)
    if name == "cpu":
        from nucleus.attention.cpu import CpuBackend

        return CpuBackend(kv)
    if name == "triton":
        if not triton_usable(device.type):
            raise ValueError(f"the triton attention backend cannot run on {device} here")
        from nucleus.attention.triton import TritonBackend

        return TritonBackend(kv, max_context)
    raise ValueError(f"unknown attention backend {name!r}: use 'auto' or one of {BACKENDS}")
