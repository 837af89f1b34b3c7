"""The reference attention backend: Meta's arithmetic on every row, padded to the step's longest.

`nucleus.Llama` runs on it for seed-for-seed results, and the other backends are tested against
it. Each sequence's keys and values are gathered through its block table into `(B, max_ctx)`,
queries into `(B, max_q)`; then, as Meta's reference: `q @ kᵀ / sqrt(hd)` in the model dtype,
the causal mask, softmax in float32 cast back, `@ v`. Any device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nucleus.attention.base import AttentionBackend, slot_mapping
from nucleus.transfer import to_device


@dataclass
class ReferenceMetadata:
    query_start: torch.Tensor  # (B+1,) cumulative query lengths
    context_lens: torch.Tensor  # (B,) KV length of each sequence after this step
    block_tables: torch.Tensor  # (B, max_blocks) block ids, padded with any valid id
    slot_mapping: torch.Tensor  # (T,) cache slot of each new token
    max_query_len: int
    max_context_len: int


def store_kv_index_copy(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Keys/values `(T, n_kv, hd)` into their cache slots, in torch."""
    n_kv, hd = k.shape[-2:]
    k_cache.view(-1, n_kv, hd).index_copy_(0, slots, k)
    v_cache.view(-1, n_kv, hd).index_copy_(0, slots, v)


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def build_metadata(
        self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]]
    ) -> ReferenceMetadata:
        device = self.kv.device
        width = max((len(t) for t in block_tables), default=1) or 1
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        return ReferenceMetadata(
            query_start=to_device(starts, torch.long, device),
            context_lens=to_device(context_lens, torch.long, device),
            block_tables=to_device(
                [t + [0] * (width - len(t)) for t in block_tables], torch.long, device
            ),
            slot_mapping=to_device(
                slot_mapping(query_lens, context_lens, block_tables, self.block_size),
                torch.long,
                device,
            ),
            max_query_len=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
        )

    def write_kv(self, k_cache, v_cache, k, v, meta: ReferenceMetadata) -> None:
        store_kv_index_copy(k_cache, v_cache, k, v, meta.slot_mapping)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: ReferenceMetadata,
    ) -> torch.Tensor:
        num_seqs = meta.context_lens.shape[0]
        n_heads, hd = q.shape[1:]
        block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
        q_lens = meta.query_start[1:] - meta.query_start[:-1]
        max_q, max_ctx = meta.max_query_len, meta.max_context_len
        device = q.device

        # Gather each sequence's keys/values into (B, max_ctx, n_kv, hd) through its block table.
        key_pos = torch.arange(max_ctx, device=device)
        blocks = meta.block_tables.gather(
            1,
            (key_pos // block_size)
            .unsqueeze(0)
            .expand(num_seqs, -1)
            .clamp(max=meta.block_tables.shape[1] - 1),
        )
        slots = blocks * block_size + key_pos % block_size
        keys = k_cache.view(-1, n_kv, hd)[slots]
        values = v_cache.view(-1, n_kv, hd)[slots]

        # Scatter the flat queries into (B, max_q, n_heads, hd).
        q_offset = torch.arange(max_q, device=device)
        q_valid = q_offset.unsqueeze(0) < q_lens.unsqueeze(1)  # (B, max_q)
        flat_index = (meta.query_start[:-1].unsqueeze(1) + q_offset).masked_fill(~q_valid, 0)
        queries = q[flat_index]  # (B, max_q, n_heads, hd)

        # Query j of sequence b sits at position context_len - q_len + j and sees keys up to it.
        q_pos = (meta.context_lens - q_lens).unsqueeze(1) + q_offset  # (B, max_q)
        visible = key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # (B, max_q, max_ctx)
        visible |= ~q_valid.unsqueeze(-1)  # padded queries see everything: no all -inf rows

        n_rep = n_heads // n_kv
        queries = queries.transpose(1, 2)  # (B, H, max_q, hd)
        keys = keys.transpose(1, 2).repeat_interleave(n_rep, dim=1)  # (B, H, max_ctx, hd)
        values = values.transpose(1, 2).repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(queries, keys.transpose(2, 3)) / math.sqrt(hd)
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).type_as(queries)
        out = torch.matmul(probs, values).transpose(1, 2)  # (B, max_q, H, hd)
        return out[q_valid]  # back to flat (T, H, hd), in query order
