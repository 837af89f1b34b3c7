"""The CUDA backend: Triton kernels for the KV store and paged decode attention.

Decode rows read the paged cache in place through their block tables (split-KV, GQA groups
together: `nucleus.kernels.triton.decode_attention`); pad rows of a graph-padded batch store
nothing and read nothing. Everything a decode step needs lives in device tensors, so a captured
CUDA graph replays it for any contexts (`decode_metadata`). All prefill chunks of a step run in
one launch of the paged prefill kernel (`nucleus.kernels.triton.prefill_attention`), their
earlier context read from the cache (prefix hits, chunked prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nucleus.attention.base import KVCache
from nucleus.attention.torch_sdpa import AttentionPlan, TorchBackend
from nucleus.kernels.triton.decode_attention import decode_attention, num_splits
from nucleus.kernels.triton.kv_store import store_kv
from nucleus.kernels.triton.prefill_attention import prefill_attention
from nucleus.transfer import to_device


@dataclass
class DecodeMetadata:
    """A decode step over device tensors (`AttentionBackend.decode_metadata`)."""

    slot_mapping: torch.Tensor  # (B,), negative for pad rows
    context_lens: torch.Tensor  # (B,)
    block_tables: torch.Tensor  # flat, B rows of table_width[0]
    table_width: torch.Tensor  # (1,)
    splits: int


@dataclass
class TritonMetadata(AttentionPlan):
    """A general step: the torch plan, plus what the Triton kernel needs for its decode rows."""

    decode_width: torch.Tensor | None = None  # (1,): the width of plan.decode_blocks
    splits: int = 1


class TritonBackend(TorchBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, kv: KVCache, max_context: int) -> None:
        super().__init__(kv)
        n_kv = kv.k.shape[3]
        device = kv.k.device
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 8
        )
        self.n_kv_heads = n_kv
        self.max_tiles = -(-max_context // 64)

    def splits_for(self, batch_size: int) -> int:
        return num_splits(batch_size, self.n_kv_heads, self.num_sms, self.max_tiles)

    def eager_decode_batches(self, max_num_seqs: int) -> list[int]:
        """The smallest batch of each split count: the decode kernel is compiled per count."""
        first: dict[int, int] = {}
        for batch in range(1, max_num_seqs + 1):
            first.setdefault(self.splits_for(batch), batch)
        return sorted(first.values())

    def build_metadata(
        self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]]
    ) -> TritonMetadata:
        plan = super().build_metadata(query_lens, context_lens, block_tables)
        meta = TritonMetadata(**vars(plan))
        if plan.decode_blocks is not None:
            meta.decode_width = to_device([plan.decode_blocks.shape[1]], torch.long, self.kv.device)
            meta.splits = self.splits_for(plan.decode_blocks.shape[0])
        return meta

    def decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        table_width: torch.Tensor,
    ) -> DecodeMetadata:
        splits = self.splits_for(slot_mapping.shape[0])
        return DecodeMetadata(slot_mapping, context_lens, block_tables, table_width, splits)

    def write_kv(self, k_cache, v_cache, k, v, meta: TritonMetadata | DecodeMetadata) -> None:
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)

    def forward(self, q, k_cache, v_cache, meta: TritonMetadata | DecodeMetadata) -> torch.Tensor:
        if isinstance(meta, DecodeMetadata):
            out = q.new_empty(q.shape)
            return decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.table_width, meta.context_lens,
                out, splits=meta.splits,
            )  # fmt: skip
        return super().forward(q, k_cache, v_cache, meta)

    def prefill(self, q, k_cache, v_cache, meta: TritonMetadata, out: torch.Tensor) -> None:
        max_q_len = max(q_len for _, q_len, _ in meta.prefills)
        prefill_attention(
            q, k_cache, v_cache, meta.prefill_chunks, meta.prefill_blocks, out, max_q_len=max_q_len
        )

    def decode(self, q, k_cache, v_cache, meta: TritonMetadata) -> torch.Tensor:
        out = q.new_empty(q.shape)
        return decode_attention(
            q, k_cache, v_cache, meta.decode_blocks, meta.decode_width, meta.decode_context,
            out, splits=meta.splits,
        )  # fmt: skip
