"""Paged prefill attention: causal attention of prompt chunks over keys read from the paged cache.

Every chunk of a step in one launch. Chunk `c` holds the last `q_len` tokens of a context of
`ctx_len`: its earlier tokens (a prefix-cache hit, or earlier chunks of a chunked prefill) and its
own keys/values (stored just before, by the KV store) are all read through its block table.
Program `(c, tile, kv_head)` takes `BLOCK_Q` query tokens of one chunk with the GQA group of query
heads of one KV head as the rows of one matrix (each K/V tile is read once for the group), and
walks the key tiles up to its last query's position with an online softmax in float32.

Keys past a query's position are masked out of its scores; their values still enter the `p·v`
product with weight 0, so a non-finite value there (never written by a working model: a
sequence's cache holds only its own values) would reach earlier rows of the tile.

Torch twin: `nucleus.attention.torch_sdpa.TorchBackend.prefill` (gather + SDPA with a causal
mask); arithmetic as the reference (`q·k` scaled, float32 softmax, probabilities cast to the
value dtype for `p·v`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nucleus.kernels.triton import next_power_of_2


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    chunks_ptr,  # (C, 3): first flat row, query length, context length
    tables_ptr,  # (C, width)
    width,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    first_row = tl.load(chunks_ptr + c * 3)
    q_len = tl.load(chunks_ptr + c * 3 + 1)
    ctx_len = tl.load(chunks_ptr + c * 3 + 2)
    if tile * BLOCK_Q >= q_len:
        return
    # Row r of the tile: its token r // GROUP_PAD, query head kv_head * GROUP + r % GROUP_PAD.
    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, ROWS)
    tok = tile * BLOCK_Q + r // GROUP_PAD
    head = kv_head * GROUP + r % GROUP_PAD
    row_ok = (tok < q_len) & (r % GROUP_PAD < GROUP)
    q_pos = ctx_len - q_len + tok  # each query's position in its sequence
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q_rows = (first_row + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(
        q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    last_pos = ctx_len - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    offs = tl.arange(0, BLOCK_K)
    table_row = tables_ptr + c.to(tl.int64) * width
    for start in range(0, last_pos + 1, BLOCK_K):
        k_pos = start + offs
        k_ok = k_pos <= last_pos
        block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        k_rows = block * stride_cb + (k_pos % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + k_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = (first_row + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_rows[:, None] + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunks: torch.Tensor,
    block_tables: torch.Tensor,
    out: torch.Tensor,
    *,
    max_q_len: int,
) -> torch.Tensor:
    """Causal attention of the prefill chunks of a flat batch, written into their rows of `out`.

    `q (T, n_heads, hd)` (rows may be strided; head_dim contiguous); caches `(blocks, block_size,
    n_kv, hd)` of one layer, already holding the chunks' own keys/values; `chunks (C, 3)` int64:
    (first flat row, query length, context length); `block_tables (C, width)` contiguous;
    `max_q_len`: the longest chunk (it sizes the grid).
    """
    _, n_heads, head_dim = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    group = n_heads // n_kv
    if n_heads % n_kv or q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("prefill_attention needs n_heads % n_kv == 0 and contiguous head_dim")
    if not block_tables.is_contiguous() or not chunks.is_contiguous():
        raise ValueError("the chunks and block tables must be contiguous")
    num_chunks = chunks.shape[0]
    if num_chunks == 0:
        return out
    # 64 rows of queries per program: BLOCK_Q tokens times the GQA group (padded to a power of 2).
    group_pad = next_power_of_2(group)
    block_q = max(1, 64 // group_pad)
    grid = (num_chunks, triton.cdiv(max_q_len, block_q), n_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, chunks, block_tables, block_tables.shape[1],
        1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_PAD=max(16, next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_K=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
