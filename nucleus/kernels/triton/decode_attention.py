"""Paged decode attention: one query per sequence over its cached keys and values.

Split-KV (flash-decoding): program `(b, kv_head, split)` reads its share of sequence `b`'s
context, tile by tile through the block table, for all query heads of that KV head at once (GQA:
the group's queries are the rows of one matrix product, so each K/V byte is read once). Each
split keeps an online softmax and writes its partial output and log-sum-exp; a second kernel
combines the splits. With one split the first kernel writes the output directly.

Everything that varies between steps (context lengths, block tables and their width) is read
from device memory, and the grid depends only on the batch size: a captured CUDA graph replays
correctly for any contexts. A sequence splits its context evenly over the splits at run time.

Torch twin: `nucleus.attention.torch.TorchBackend.forward` (gather + SDPA); arithmetic as the
reference (`q·k` scaled, softmax in float32, probabilities cast to the value dtype for `p·v`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nucleus.kernels.triton import next_power_of_2


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tables_ptr,
    width_ptr,
    context_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,  # cache strides: block, position in block, KV head (head_dim is contiguous)
    stride_ct,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,  # of the float32 products: "ieee", not tf32, for a float32 cache
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(context_ptr + b)
    width = tl.load(width_ptr)
    n_tiles = tl.cdiv(context, TILE)
    per_split = tl.cdiv(n_tiles, SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, n_tiles)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=head_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    offs = tl.arange(0, TILE)
    table_row = tables_ptr + b.to(tl.int64) * width
    for tile in range(first, last):
        pos = tile * TILE + offs
        valid = pos < context
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # an empty split (or pad row) gives zeros
    out_mask = head_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        part = (b * NUM_HEADS + heads) * SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=head_ok)


@triton.jit
def _decode_combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_PAD)
    base = (b * NUM_HEADS + h) * SPLITS
    lse = tl.load(part_lse_ptr + base + s)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)  # exp(-inf) = 0 for empty splits
    total = tl.sum(w, 0)
    part = tl.load(
        part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=d[None, :] < HEAD_DIM
    )
    o = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + d,
        o.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def num_splits(batch_size: int, n_kv_heads: int, num_sms: int, max_tiles: int) -> int:
    """Splits per sequence so that the grid covers about two waves of the GPU, as a power of two,
    at most 64 and never more than a sequence's tiles at the longest context."""
    want = max(1, -(-2 * num_sms // max(batch_size * n_kv_heads, 1)))
    return max(1, min(next_power_of_2(want), 64, next_power_of_2(max(max_tiles, 1))))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    table_width: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    *,
    splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    tile: int = 64,
) -> torch.Tensor:
    """Attention of `q (B, n_heads, hd)` (one query per sequence) over the first
    `context_lens[b]` positions of one layer's cache `(blocks, block_size, n_kv, hd)`, found through
    `block_tables`: a flat int tensor holding `B` rows of `table_width[0]` block ids (a one-element
    device tensor, so that a captured graph serves any width). Writes `out (B, n_heads, hd)`.

    `splits` (a power of two) sets the split-KV grid; `workspace` is `(partial outputs (B * n_heads
    * splits * hd,) float32, log-sum-exps (B * n_heads * splits,) float32)`, allocated if not given.
    """
    batch, n_heads, head_dim = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    group = n_heads // n_kv
    if n_heads % n_kv or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("decode_attention needs n_heads % n_kv == 0 and contiguous head_dim")
    if tile % block_size and block_size % tile:
        raise ValueError(f"tile {tile} and block size {block_size} must divide one another")
    if splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    if batch == 0:
        return out
    if workspace is None:
        workspace = (
            torch.empty(batch * n_heads * splits * head_dim, dtype=torch.float32, device=q.device),
            torch.empty(batch * n_heads * splits, dtype=torch.float32, device=q.device),
        )
    part_out, part_lse = workspace
    head_pad = max(16, next_power_of_2(head_dim))
    _decode_split_kernel[(batch, n_kv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        table_width,
        context_lens,
        out,
        part_out,
        part_lse,
        1.0 / math.sqrt(head_dim),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=n_heads,
        GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        TILE=tile,
        SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _decode_combine_kernel[(batch, n_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=n_heads,
            HEAD_DIM=head_dim,
            HEAD_PAD=head_pad,
            SPLITS=splits,
        )
    return out
