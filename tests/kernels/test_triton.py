"""The Triton kernels of `nucleus.kernels.triton` against their torch twins on the same inputs.

In CI (no GPU) they run through Triton's interpreter on the CPU (`TRITON_INTERPRET=1`, set in
conftest.py); on a CUDA machine they run on the GPU. Oracles: the reference attention backend
(`ReferenceBackend`, checked against transformers) for decode attention, `index_copy_` for the KV
store, `TorchOps` (the reference's formulas and rounding) for RMSNorm, RoPE and SwiGLU.
Tolerances: float32 1e-5 relative; bf16 1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch
from steps import paged_cache as shared_paged_cache

from nucleus.attention import KVCache, ReferenceBackend
from nucleus.kernels.triton import triton_usable
from nucleus.ops import TorchOps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_usable(DEVICE), reason="Triton is not installed (or not usable on this device)"
)
# Triton's interpreter does not compute bf16 as a GPU does (its casts from float32 do not round to
# nearest, and its bf16 matrix products are wrong): the bf16 cases run on the GPU only.
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels are checked on the GPU"),
)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and torch.isfinite(ours).all()
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def paged_cache(contexts, n_kv, head_dim, *, dtype=torch.float32, seed=0):
    return shared_paged_cache(contexts, n_kv, head_dim, dtype=dtype, device=DEVICE, seed=seed)


def flat_tables(tables, width=None):
    width = width or max(map(len, tables), default=1)
    flat = torch.zeros(max(len(tables), 1) * width, dtype=torch.int32)
    for i, t in enumerate(tables):
        flat[i * width : i * width + len(t)] = torch.tensor(t, dtype=torch.int32)
    return flat.to(DEVICE), torch.tensor([width], dtype=torch.int32, device=DEVICE)


def reference_decode(q, k_cache, v_cache, tables, contexts):
    backend = ReferenceBackend(KVCache(k_cache[None], v_cache[None]))
    meta = backend.build_metadata([1] * len(contexts), contexts, tables)
    return backend.forward(q, k_cache, v_cache, meta)


# GQA groups 1, 4 and 8; head sizes 64 and 128; contexts from one token to many blocks.
@pytest.mark.parametrize(("n_heads", "n_kv", "head_dim"), [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_equals_the_reference(n_heads, n_kv, head_dim, splits):
    from nucleus.kernels.triton.decode_attention import decode_attention

    contexts = [1, 16, 17, 70, 200]
    k_cache, v_cache, tables = paged_cache(contexts, n_kv, head_dim)
    q = torch.randn(len(contexts), n_heads, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(DEVICE)
    ref = reference_decode(q, k_cache, v_cache, tables, contexts)
    flat, width = flat_tables(tables)
    out = torch.full_like(q, float("nan"))  # every element must be written
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    decode_attention(q, k_cache, v_cache, flat, width, ctx, out, splits=splits)
    assert rel_err(out, ref) <= 1e-5


def test_decode_attention_reads_strided_queries_and_gives_zeros_for_pad_rows():
    """Queries as views into fused Q/K/V rows; pad rows (context 0) of a graph-padded batch."""
    from nucleus.kernels.triton.decode_attention import decode_attention

    contexts = [33, 5]
    k_cache, v_cache, tables = paged_cache(contexts, 2, 64, seed=2)
    qkv = torch.randn(4, (8 + 2 + 2) * 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q = qkv[:, : 8 * 64].view(4, 8, 64)
    ref = reference_decode(q[:2], k_cache, v_cache, tables, contexts)
    flat, width = flat_tables([*tables, [], []], width=4)  # wider rows than needed
    ctx = torch.tensor([*contexts, 0, 0], dtype=torch.int32, device=DEVICE)
    out = torch.full((4, 8, 64), float("nan"), device=DEVICE)
    decode_attention(q, k_cache, v_cache, flat, width, ctx, out, splits=2)
    assert rel_err(out[:2], ref) <= 1e-5
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels are checked on the GPU")
def test_decode_attention_in_bf16_is_within_bf16_rounding_of_the_reference():
    from nucleus.kernels.triton.decode_attention import decode_attention

    contexts = [40, 130]
    k_cache, v_cache, tables = paged_cache(contexts, 2, 64, dtype=torch.bfloat16, seed=4)
    q = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    ref = reference_decode(q, k_cache, v_cache, tables, contexts)
    flat, width = flat_tables(tables)
    out = torch.empty_like(q)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    decode_attention(q, k_cache, v_cache, flat, width, ctx, out, splits=4)
    assert rel_err(out.float(), ref.float()) <= 1e-2


def prefill_against_reference(q_lens, contexts, n_heads, n_kv, head_dim, *, dtype=torch.float32,
                              seed=3, edit=None):  # fmt: skip
    from nucleus.kernels.triton.prefill_attention import prefill_attention

    k_cache, v_cache, tables = paged_cache(contexts, n_kv, head_dim, dtype=dtype, seed=seed)
    if edit is not None:
        edit(k_cache, v_cache, tables)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=g).to(DEVICE, dtype)
    backend = ReferenceBackend(KVCache(k_cache[None], v_cache[None]))
    ref = backend.forward(q, k_cache, v_cache, backend.build_metadata(q_lens, contexts, tables))
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    chunks = torch.tensor(list(zip(starts, q_lens, contexts, strict=True)), device=DEVICE)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    out = torch.full_like(q, float("nan"))  # every element must be written
    prefill_attention(q, k_cache, v_cache, chunks, padded, out, max_q_len=max(q_lens))
    return out, ref


# Chunks from position 0 and part-way through their context (prefix hits, chunked prefill),
# across block boundaries; GQA groups 1, 3 (not a power of two), 4 and 8; head sizes 64 and 128.
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim"), [(4, 4, 64), (9, 3, 64), (8, 2, 128), (8, 1, 64)]
)
def test_prefill_attention_equals_the_reference(n_heads, n_kv, head_dim):
    out, ref = prefill_against_reference([2, 17, 5, 70], [2, 17, 37, 130], n_heads, n_kv, head_dim)
    assert rel_err(out, ref) <= 1e-5


def test_prefill_attention_is_causal_even_for_a_nan_key_at_a_later_position():
    """(A NaN value, not key, would reach earlier rows of its tile as 0 * NaN in the `p·v`
    product, as in every flash-attention kernel: the cache of a sequence holds only its own,
    finite values.)"""

    def poison(k_cache, v_cache, tables):  # position 10 of the only sequence
        k_cache[tables[0][0], 10] = float("nan")

    out, _ = prefill_against_reference([20], [20], 4, 2, 32, edit=poison)
    assert torch.isfinite(out[:10]).all()  # rows before position 10 never read it
    assert torch.isnan(out[10:]).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels are checked on the GPU")
def test_prefill_attention_in_bf16_is_within_bf16_rounding_of_the_reference():
    out, ref = prefill_against_reference([100, 31], [100, 300], 32, 8, 128, dtype=torch.bfloat16)
    assert rel_err(out.float(), ref.float()) <= 1e-2


def test_store_kv_writes_strided_rows_at_their_slots_and_skips_pad_slots():
    from nucleus.kernels.triton.kv_store import store_kv

    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(4, 16, 2, 32, generator=g).to(DEVICE)
    v_cache = torch.randn(4, 16, 2, 32, generator=g).to(DEVICE)
    qkv = torch.randn(5, (4 + 2 + 2) * 32, generator=g).to(DEVICE)
    k = qkv[:, 4 * 32 : 6 * 32].view(5, 2, 32)
    v = qkv[:, 6 * 32 :].view(5, 2, 32)
    slots = torch.tensor([63, 0, -1, 18, 40], dtype=torch.int32, device=DEVICE)
    keep = slots >= 0
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_k.view(-1, 2, 32).index_copy_(0, slots[keep].long(), k[keep])
    ref_v.view(-1, 2, 32).index_copy_(0, slots[keep].long(), v[keep])
    store_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("dim", [64, 576, 100])
def test_rms_norm_and_its_fused_residual_add_equal_the_torch_twin(dtype, dim):
    from nucleus.kernels.triton.rms_norm import add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(7, dim, generator=g) * 3).to(DEVICE, dtype)
    residual = torch.randn(7, dim, generator=g).to(DEVICE, dtype)
    weight = torch.randn(dim, generator=g).to(DEVICE, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    twin = TorchOps()
    assert rel_err(rms_norm(x, weight, 1e-5).float(), twin.rms_norm(x, weight, 1e-5).float()) <= tol
    ref_residual = residual.clone()
    ref = twin.add_rms_norm(x, ref_residual, weight, 1e-5)
    ours = add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, ref_residual)  # the sum rounded to the model dtype, as x + h
    assert rel_err(ours.float(), ref.float()) <= tol


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_on_the_q_and_k_heads_of_fused_rows_equals_the_torch_twin(scaled):
    from nucleus.config import RopeScaling
    from nucleus.model import rope_frequencies
    from nucleus.ops.triton_ops import TritonOps

    freqs = rope_frequencies(64, 500000.0, RopeScaling() if scaled else None).to(DEVICE)
    positions = torch.tensor([0, 1, 7, 300, 4097], device=DEVICE)
    qkv = torch.randn(5, (4 + 2 + 2) * 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    before = qkv.clone()
    twin = TorchOps()
    ref = twin.rotary(before[:, : 6 * 64].view(5, 6, 64), twin.rope(freqs, positions))
    ops = TritonOps(max_positions=8192)
    ops.rotary(qkv[:, : 6 * 64].view(5, 6, 64), ops.rope(freqs, positions))
    assert rel_err(qkv[:, : 6 * 64].reshape(5, 6, 64), ref) <= 1e-5
    assert torch.equal(qkv[:, 6 * 64 :], before[:, 6 * 64 :])  # V untouched


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_silu_mul_equals_the_torch_twin(dtype):
    from nucleus.kernels.triton.silu_mul import silu_mul

    gate_up = (torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(0)) * 4).to(
        DEVICE, dtype
    )
    gate_up[0, 0] = -100.0  # silu's saturated tail: ~0, not NaN
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(silu_mul(gate_up).float(), TorchOps().silu_mul(gate_up).float()) <= tol
