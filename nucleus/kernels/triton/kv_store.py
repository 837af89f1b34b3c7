"""Store one layer's new keys and values into their paged-cache slots, driven by the slot map.

Torch twin: `index_copy_` into the cache viewed as `(slots, n_kv, hd)` (`attention.torch.TorchBackend`).
A negative slot is a pad row (a CUDA-graph batch padded to its bucket): nothing is written for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nucleus.kernels.triton import next_power_of_2


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k,
    stride_v,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    mask = (offs < ROW) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_v + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`k`, `v (T, n_kv, hd)` (each row's heads contiguous; rows may be strided, as views into a
    fused QKV output) into slots `slot_mapping (T,)` of one layer's `(blocks, block_size, n_kv, hd)`
    caches; rows whose slot is negative are skipped."""
    tokens, n_kv, hd = k.shape
    row = n_kv * hd
    if k.stride(2) != 1 or k.stride(1) != hd or v.stride(2) != 1 or v.stride(1) != hd:
        raise ValueError("each row of k and v must hold its heads contiguously")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row, next_power_of_2(row)
    )
