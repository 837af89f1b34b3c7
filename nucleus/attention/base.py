"""The paged KV cache and the attention-backend interface.

The model writes each new token's key and value into a pool of fixed-size blocks and reads a
sequence's past through its block table. The same layout serves Meta's reference loop (one block
table per batch row) and the engine (blocks handed out and shared by the block manager).

A backend is chosen once, when a model runner is built (`nucleus.attention.select_backend`), and
owns that step's work on the cache: it turns the runner's host-side layout of a flat batch into
its own metadata, stores the new keys and values, and computes attention. Backends that can run
inside a captured CUDA graph also build decode metadata over the runner's static buffers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nucleus.config import ModelConfig
from nucleus.distributed.layers import local_units
from nucleus.engine.kv_budget import lazy_zeros


@dataclass
class KVCache:
    """Keys and values of every layer: `(n_layers, num_blocks, block_size, n_kv_heads, head_dim)`,
    where `n_kv_heads` are the KV heads of this rank (of a tensor-parallel group of `world_size`:
    its share, or the one it replicates when there are fewer KV heads than ranks)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        world_size: int = 1,
    ) -> KVCache:
        n_kv = local_units(config.n_kv_heads, world_size)
        shape = (config.n_layers, num_blocks, block_size, n_kv, config.head_dim)
        return cls(k=_zeros(shape, dtype, device), v=_zeros(shape, dtype, device))

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, block_size: int, dtype: torch.dtype, world_size: int = 1
    ) -> int:
        """The bytes of one block on each rank."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        n_kv = local_units(config.n_kv_heads, world_size)
        return 2 * config.n_layers * block_size * n_kv * config.head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.k.device


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros; on the CPU as pages the OS maps lazily (`kv_budget.lazy_zeros`), so a cache of
    gigabytes costs memory only as it fills."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(lazy_zeros(nbytes)).view(dtype).view(shape)


def slot_mapping(
    query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int
) -> np.ndarray:
    """The cache slot (`block * block_size + offset`) of every query token, in flat order: the
    query tokens of row `i` are the last `query_lens[i]` of its `context_lens[i]`."""
    parts = []
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
        pos = np.arange(ctx_len - q_len, ctx_len)
        parts.append(
            np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size
        )
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class AttentionBackend(ABC):
    """Stores keys/values and computes causal GQA attention over the paged cache `kv`.

    The model calls it once per layer: `backend(layer, q, k, v, meta)` with `q (T, n_heads, hd)`,
    `k`, `v (T, n_kv, hd)` of this step's tokens (views into the fused Q/K/V output: rows may be
    strided), and `meta` from `build_metadata` (or `decode_metadata`) for the step.
    """

    name = "abstract"
    supports_cuda_graphs = False

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @abstractmethod
    def build_metadata(
        self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]]
    ) -> Any:
        """This backend's metadata for a flat batch whose row `i` computes the last
        `query_lens[i]` tokens of a context of `context_lens[i]`, stored through
        `block_tables[i]`; tensors go to the cache's device without waiting."""

    @abstractmethod
    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Any,
    ) -> None:
        """Store one layer's new keys/values at their slots."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Attention of the step's queries over one layer's cache: `(T, n_heads, hd)`."""

    def eager_decode_batches(self, max_num_seqs: int) -> list[int]:
        """Numbers of decode rows, up to `max_num_seqs`, whose eager steps (beside a prefill)
        run differently compiled kernels: the runner runs one step of each at start-up, so that
        no kernel compiles under the first requests. One size unless a backend says otherwise."""
        return [1]

    def decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        table_width: torch.Tensor,
    ) -> Any:
        """Metadata of a decode step (one query per row, in order) over device tensors that a
        captured graph keeps: slots `(B,)` (negative: a pad row, nothing stored), context lengths
        `(B,)` (0 for pad rows), block tables as a flat tensor of `B` rows of `table_width[0]` ids.
        Only backends with `supports_cuda_graphs`."""
        raise NotImplementedError(f"the {self.name} attention backend has no graph decode path")

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]
        self.write_kv(k_cache, v_cache, k, v, meta)
        return self.forward(q, k_cache, v_cache, meta)
