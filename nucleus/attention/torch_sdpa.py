"""The portable engine backend: attention per kind of row, through torch SDPA (any device).

A step's rows are split on the host (`AttentionPlan`): decode rows (one query each) run together
over their own longest context, each prefill chunk over its own context, instead of padding every
row to the step's longest query and context (`reference.py`). The arithmetic per sequence is the
reference's, through torch's fused attention (float32 softmax, GQA without repeating K/V).
Subclasses replace the decode and prefill parts with kernels (`cpu.py`, `triton.py`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nucleus.attention.base import AttentionBackend, slot_mapping
from nucleus.attention.reference import store_kv_index_copy
from nucleus.transfer import to_device


@dataclass
class AttentionPlan:
    """A flat batch split into decode rows and prefill chunks (tensors on the cache's device).

    decode_tokens (D,): flat index of each decode row's query; decode_blocks (D, nb): their block
    ids (padded with block 0); decode_context (D,): their context lengths. prefills: per chunk
    `(first flat token, query length, context length)`, also as the tensor prefill_chunks (C, 3),
    with prefill_blocks (C, nb) their block ids (padded with block 0).
    """

    slot_mapping: torch.Tensor  # (T,) cache slot of each new token
    decode_tokens: torch.Tensor | None
    decode_blocks: torch.Tensor | None
    decode_context: torch.Tensor | None
    prefills: list[tuple[int, int, int]]
    prefill_chunks: torch.Tensor | None
    prefill_blocks: torch.Tensor | None
    all_decode_in_order: bool  # the batch is only decodes, token i is row i

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionPlan:
        dec_rows, dec_tokens, pre_rows, prefills = [], [], [], []
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens, strict=True)):
            if q_len == 1:
                dec_rows.append(i)
                dec_tokens.append(start)
            else:
                pre_rows.append(i)
                prefills.append((start, q_len, ctx_len))
            start += q_len

        def tables(rows: list[int]) -> torch.Tensor:
            width = -(-max(context_lens[i] for i in rows) // block_size)
            padded = [block_tables[i][:width] for i in rows]
            return to_device([t + [0] * (width - len(t)) for t in padded], torch.long, device)

        decodes = bool(dec_rows)
        return cls(
            slot_mapping=to_device(
                slot_mapping(query_lens, context_lens, block_tables, block_size), torch.long, device
            ),
            decode_tokens=to_device(dec_tokens, torch.long, device) if decodes else None,
            decode_blocks=tables(dec_rows) if decodes else None,
            decode_context=to_device([context_lens[i] for i in dec_rows], torch.long, device)
            if decodes
            else None,
            prefills=prefills,
            prefill_chunks=to_device(prefills, torch.long, device) if prefills else None,
            prefill_blocks=tables(pre_rows) if prefills else None,
            all_decode_in_order=decodes and not prefills,
        )


_workspace = threading.local()


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, slot: int) -> torch.Tensor:
    """`cache[blocks]` for a `(num_blocks, ...)` cache, into a reused buffer (a fresh large
    tensor per layer costs more in page faults than the copy itself)."""
    rows = blocks.numel()
    per_block = cache[0].numel()
    need = rows * per_block
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    key = (slot, cache.dtype, cache.device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < need:
        buf = bufs[key] = torch.empty(max(need, 1) * 5 // 4, dtype=cache.dtype, device=cache.device)
    out = buf[:need].view(rows, per_block)
    torch.index_select(cache.view(cache.shape[0], per_block), 0, blocks.reshape(-1), out=out)
    return out.view(*blocks.shape, *cache.shape[1:])


def sdpa(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
    """queries (B, H, Q, hd); keys/values (B, L, n_kv, hd) read in place; visible (B, 1, Q, L).

    torch's fused attention (float32 softmax, GQA without repeating K/V): the reference's
    arithmetic up to rounding (about 1e-7 relative in float32)."""
    return F.scaled_dot_product_attention(
        queries,
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible,
        enable_gqa=keys.shape[2] != queries.shape[1],
    )


class TorchBackend(AttentionBackend):
    name = "torch"

    def build_metadata(
        self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]]
    ) -> AttentionPlan:
        return AttentionPlan.build(
            query_lens, context_lens, block_tables, self.block_size, self.kv.device
        )

    def write_kv(self, k_cache, v_cache, k, v, meta: AttentionPlan) -> None:
        store_kv_index_copy(k_cache, v_cache, k, v, meta.slot_mapping)

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionPlan
    ) -> torch.Tensor:
        if meta.all_decode_in_order:
            return self.decode(q, k_cache, v_cache, meta)
        out = q.new_empty(q.shape)
        if meta.decode_tokens is not None:
            qd = q.index_select(0, meta.decode_tokens)
            out.index_copy_(0, meta.decode_tokens, self.decode(qd, k_cache, v_cache, meta))
        if meta.prefills:
            self.prefill(q, k_cache, v_cache, meta, out)
        return out

    def decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionPlan
    ) -> torch.Tensor:
        """Attention of the decode rows' queries `(D, n_heads, hd)`, one per row."""
        D, n_heads, hd = q.shape
        block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
        nb = meta.decode_blocks.shape[1]
        keys = gather_blocks(k_cache, meta.decode_blocks, 0).view(D, nb * block_size, n_kv, hd)
        values = gather_blocks(v_cache, meta.decode_blocks, 1).view(D, nb * block_size, n_kv, hd)
        key_pos = torch.arange(nb * block_size, device=q.device)
        visible = (key_pos[None, :] < meta.decode_context[:, None]).view(D, 1, 1, -1)
        return sdpa(q.reshape(D, n_heads, 1, hd), keys, values, visible).view(D, n_heads, hd)

    def prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionPlan,
        out: torch.Tensor,
    ) -> None:
        """Causal attention of each prefill chunk over its context, into its rows of `out`."""
        block_size, n_kv, hd = k_cache.shape[1:]
        for c, (start, q_len, ctx_len) in enumerate(meta.prefills):
            blocks = meta.prefill_blocks[c, : -(-ctx_len // block_size)]
            nb = blocks.shape[0]
            keys = gather_blocks(k_cache, blocks, 0).view(1, nb * block_size, n_kv, hd)
            values = gather_blocks(v_cache, blocks, 1).view(1, nb * block_size, n_kv, hd)
            key_pos = torch.arange(nb * block_size, device=q.device)
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            visible = (key_pos[None, :] <= q_pos[:, None]).view(1, 1, q_len, -1)
            qp = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q_len, hd)
            out[start : start + q_len] = sdpa(qp, keys, values, visible)[0].transpose(0, 1)
