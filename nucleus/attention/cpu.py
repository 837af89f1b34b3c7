"""The CPU backend: the C kernels of `nucleus.kernels.cpu` on a float32 cache.

Decode rows and prefill chunks read the paged cache in place (no gather into padded copies), and
the new keys/values are stored in one pass. The prefill kernel tiles the head dimension by 16;
other head sizes keep the torch prefill of `TorchBackend`. Results equal the torch backend's up
to float32 summation order.
"""

from __future__ import annotations

import torch

from nucleus.attention.base import KVCache
from nucleus.attention.torch_sdpa import AttentionPlan, TorchBackend
from nucleus.kernels import cpu as cpu_kernels


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, kv: KVCache) -> None:
        if kv.k.device.type != "cpu" or kv.k.dtype != torch.float32:
            raise ValueError("the CPU attention kernels need a float32 cache on the CPU")
        super().__init__(kv)
        self.prefill_kernel = kv.k.shape[-1] % 16 == 0

    def write_kv(self, k_cache, v_cache, k, v, meta: AttentionPlan) -> None:
        cpu_kernels.write_kv(k_cache, v_cache, k.contiguous(), v.contiguous(), meta.slot_mapping)

    def decode(self, q, k_cache, v_cache, meta: AttentionPlan) -> torch.Tensor:
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_blocks, meta.decode_context
        )

    def prefill(self, q, k_cache, v_cache, meta: AttentionPlan, out: torch.Tensor) -> None:
        if not self.prefill_kernel:
            return super().prefill(q, k_cache, v_cache, meta, out)
        cpu_kernels.paged_prefill_attention(
            q, k_cache, v_cache, meta.prefill_chunks, meta.prefill_blocks, out
        )
