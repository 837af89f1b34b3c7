"""Paged KV cache and the portable attention backend (plain torch: CPU and CUDA).

The model writes each new token's key and value into a pool of fixed-size blocks and reads a
sequence's past through its block table. The same layout serves Meta's reference loop (one block
table per batch row) and the engine (blocks handed out and shared by the block manager).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nucleus.config import ModelConfig
from nucleus.kernels import cpu as cpu_kernels


@dataclass
class KVCache:
    """Keys and values of every layer: `(n_layers, num_blocks, block_size, n_kv_heads, head_dim)`."""

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
    ) -> KVCache:
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
        )

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def _long_tensor(values: list, device: torch.device | str) -> torch.Tensor:
    """int64 host lists to `device`, without waiting for the copy."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class AttentionMetadata:
    """Where a flat batch's tokens sit: built once per step by whoever drives the model."""

    query_start: torch.Tensor  # (B+1,) cumulative query lengths
    context_lens: torch.Tensor  # (B,) KV length of each sequence after this step
    block_tables: torch.Tensor  # (B, max_blocks) block ids, padded with any valid id
    slot_mapping: torch.Tensor  # (T,) cache slot of each new token: block * block_size + offset
    max_query_len: int
    max_context_len: int
    # Optional host-side layout (`AttentionPlan.build`): with it, attention runs per kind of row
    # (decodes batched together, each prefill on its own) instead of padding every sequence to the
    # step's longest query and context. Same arithmetic per sequence either way.
    plan: AttentionPlan | None = field(default=None, compare=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        *,
        planned: bool = False,
    ) -> AttentionMetadata:
        """From plain lists: query tokens are the last `query_lens[i]` of `context_lens[i]`.
        `planned` adds the `AttentionPlan` (the engine's layout; see `plan`)."""
        slots: list[int] = []
        for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables, strict=True):
            for pos in range(ctx_len - q_len, ctx_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)

        return cls(
            query_start=_long_tensor(starts, device),
            context_lens=_long_tensor(context_lens, device),
            block_tables=_long_tensor(padded, device),
            slot_mapping=_long_tensor(slots, device),
            max_query_len=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
            plan=AttentionPlan.build(query_lens, context_lens, block_tables, block_size, device)
            if planned
            else None,
        )


@dataclass
class AttentionPlan:
    """Host-side split of a flat batch: the decode rows (one query each) and the prefill chunks.

    decode_tokens (D,): flat index of each decode row's query; decode_blocks (D, nb): their block
    ids (padded with block 0); decode_context (D,): their context lengths. prefills: per chunk
    `(first flat token, query length, context length)`, also as the tensor prefill_chunks (C, 3),
    with prefill_blocks (C, nb) their block ids (padded with block 0).
    """

    decode_tokens: torch.Tensor | None
    decode_blocks: torch.Tensor | None
    decode_context: torch.Tensor | None
    decode_max_context: int
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
            return _long_tensor([t + [0] * (width - len(t)) for t in padded], device)

        decodes = bool(dec_rows)
        ctx = [context_lens[i] for i in dec_rows]
        return cls(
            decode_tokens=_long_tensor(dec_tokens, device) if decodes else None,
            decode_blocks=tables(dec_rows) if decodes else None,
            decode_context=_long_tensor(ctx, device) if decodes else None,
            decode_max_context=max(ctx, default=0),
            prefills=prefills,
            prefill_chunks=_long_tensor(prefills, device) if prefills else None,
            prefill_blocks=tables(pre_rows) if prefills else None,
            all_decode_in_order=decodes and not prefills,
        )


_workspace = threading.local()


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, slot: int) -> torch.Tensor:
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


def _sdpa(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor):
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


def planned_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """`paged_attention` driven by `meta.plan`: decodes in one batched call over their own
    longest context, prefill chunks each over its own context; no K/V repeated for GQA. On the
    CPU in float32 both run in `nucleus.kernels` (reading the cache in place), else torch SDPA."""
    plan = meta.plan
    T, n_heads, hd = q.shape
    block_size, n_kv = cache_k.shape[1], cache_k.shape[2]
    out = q.new_empty(T, n_heads, hd) if not plan.all_decode_in_order else None
    if plan.decode_tokens is not None:
        D = plan.decode_tokens.shape[0]
        qd = q if plan.all_decode_in_order else q.index_select(0, plan.decode_tokens)
        if cpu_kernels.decode_attention_available(qd, cache_k):
            o = cpu_kernels.paged_decode_attention(
                qd, cache_k, cache_v, plan.decode_blocks, plan.decode_context
            )
        else:
            nb = plan.decode_blocks.shape[1]
            keys = _gather_blocks(cache_k, plan.decode_blocks, 0).view(D, nb * block_size, n_kv, hd)
            values = _gather_blocks(cache_v, plan.decode_blocks, 1)
            values = values.view(D, nb * block_size, n_kv, hd)
            key_pos = torch.arange(nb * block_size, device=q.device)
            visible = (key_pos[None, :] < plan.decode_context[:, None]).view(D, 1, 1, -1)
            o = _sdpa(qd.view(D, n_heads, 1, hd), keys, values, visible).view(D, n_heads, hd)
        if out is None:
            return o
        out.index_copy_(0, plan.decode_tokens, o)
    if not plan.prefills:
        return out
    if cpu_kernels.prefill_attention_available(q, cache_k):
        cpu_kernels.paged_prefill_attention(
            q, cache_k, cache_v, plan.prefill_chunks, plan.prefill_blocks, out
        )
        return out
    for c, (start, q_len, ctx_len) in enumerate(plan.prefills):
        blocks = plan.prefill_blocks[c, : -(-ctx_len // block_size)]
        nb = blocks.shape[0]
        keys = _gather_blocks(cache_k, blocks, 0).view(1, nb * block_size, n_kv, hd)
        values = _gather_blocks(cache_v, blocks, 1).view(1, nb * block_size, n_kv, hd)
        key_pos = torch.arange(nb * block_size, device=q.device)
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        visible = (key_pos[None, :] <= q_pos[:, None]).view(1, 1, q_len, -1)
        qp = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q_len, hd)
        o = _sdpa(qp, keys, values, visible)
        out[start : start + q_len] = o[0].transpose(0, 1)
    return out


def write_kv(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values `(T, n_kv, hd)` of one layer at their slots."""
    if cpu_kernels.elementwise_available(cache_k, cache_v, k, v):
        return cpu_kernels.write_kv(cache_k, cache_v, k, v, slot_mapping)
    n_kv, hd = k.shape[-2:]
    cache_k.view(-1, n_kv, hd).index_copy_(0, slot_mapping, k)
    cache_v.view(-1, n_kv, hd).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Causal GQA attention of flat queries `(T, n_heads, hd)` over each sequence's cached keys.

    Arithmetic as Meta's reference: `q @ kᵀ / sqrt(hd)` in the model dtype, softmax in float32 cast
    back, then `@ v`. Sequences are padded to the longest query and context of the step, unless
    `meta.plan` is given (`planned_attention`: the same arithmetic without that padding).
    """
    if meta.plan is not None:
        return planned_attention(q, cache_k, cache_v, meta)
    num_seqs = meta.context_lens.shape[0]
    n_heads, hd = q.shape[1:]
    block_size, n_kv = cache_k.shape[1], cache_k.shape[2]
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
    keys = cache_k.view(-1, n_kv, hd)[slots]
    values = cache_v.view(-1, n_kv, hd)[slots]

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
