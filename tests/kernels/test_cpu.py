"""The C kernels of `nucleus.kernels.cpu` against torch on the same inputs.

Oracles: a float64 torch product of the dequantized weight (block-int8 linear), the reference
attention backend (`nucleus.attention.ReferenceBackend`, itself checked against transformers) for
decode and prefill attention, float64 formulas for RMSNorm and RoPE, `index_copy_` for the KV
store.
Tolerance: 1e-5 relative (float32; only the summation order differs).
"""

from __future__ import annotations

import pytest
import torch
from steps import paged_cache

from nucleus.attention import KVCache, ReferenceBackend
from nucleus.attention.cpu import CpuBackend
from nucleus.kernels import cpu as cpu_kernels
from nucleus.kernels.cpu import BlockInt8Weight, block_int8_linear, paged_decode_attention
from nucleus.ops import TorchOps

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="no C compiler: the CPU kernels are not built"
)


def one_layer(backend_cls, cache_k: torch.Tensor, cache_v: torch.Tensor):
    """A backend over a one-layer cache made of these tensors."""
    return backend_cls(KVCache(cache_k[None], cache_v[None]))


def random_block_int8(n: int, k: int, *, signed: bool, seed: int) -> BlockInt8Weight:
    g = torch.Generator().manual_seed(seed)
    low, high = (-128, 128) if signed else (0, 16)  # Q8_0-like, Q4_1-like
    q = torch.randint(low, high, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02).half().float()
    offset = (torch.randn(n, k // 32, generator=g) * 0.05).half().float()
    if signed:
        offset.zero_()
    return BlockInt8Weight.pack(q, scale, offset)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert (ours.double() - ref.double()).abs().max().item() <= rel * scale


def test_pack_keeps_every_value_and_refuses_shapes_that_do_not_tile():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(48, 2, generator=g).half().float()  # GGUF scales are float16
    offset = torch.randn(48, 2, generator=g)
    w = BlockInt8Weight.pack(q, scale, offset)
    assert w.shape == (48, 64) and w.q.shape == (3, 64, 16)
    expected = scale.repeat_interleave(32, 1) * q.float() + offset.repeat_interleave(32, 1)
    assert torch.equal(w.dequantize(), expected)
    with pytest.raises(ValueError, match="panels of 16"):
        BlockInt8Weight.pack(q[:40], scale[:40], offset[:40])


# Row counts through every path: the in-register rebuild (1-4), the 6-row tile and its tails,
# and more rows than one cache chunk (96).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 64, 97, 200])
@pytest.mark.parametrize(("n", "k", "signed"), [(48, 64, False), (32, 96, True), (576, 192, False)])
def test_block_int8_linear_equals_the_float64_product(rows, n, k, signed):
    w = random_block_int8(n, k, signed=signed, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n + rows))
    ref = x.double() @ w.dequantize().double().T
    assert_close(block_int8_linear(x, w), ref)


def test_block_int8_linear_keeps_leading_dimensions_as_f_linear_does():
    w = random_block_int8(32, 64, signed=True, seed=5)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    ours = block_int8_linear(x, w)
    assert ours.shape == (2, 3, 32)
    assert_close(ours, torch.nn.functional.linear(x.double(), w.dequantize().double()))


def test_block_int8_linear_takes_a_non_contiguous_input_and_checks_width():
    w = random_block_int8(32, 64, signed=True, seed=1)
    x = torch.randn(64, 10).T  # (10, 64), not contiguous
    assert_close(block_int8_linear(x, w), x.double() @ w.dequantize().double().T)
    with pytest.raises(ValueError, match="columns"):
        block_int8_linear(torch.randn(3, 32), w)


def test_block_int8_linear_propagates_nan():
    w = random_block_int8(32, 64, signed=False, seed=2)
    x = torch.randn(7, 64)
    x[3, 5] = float("nan")
    y = block_int8_linear(x, w)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[[0, 1, 2, 4, 5, 6]]).all()


def _paged_setup(contexts, n_heads, n_kv, head_dim, block_size=16, seed=0):
    cache_k, cache_v, tables = paged_cache(
        contexts, n_kv, head_dim, block_size=block_size, seed=seed
    )
    q = torch.randn(len(contexts), n_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    return q, cache_k, cache_v, tables


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim"), [(9, 3, 64), (8, 8, 64), (8, 2, 128), (4, 1, 24)]
)
def test_paged_decode_attention_equals_the_torch_backend(n_heads, n_kv, head_dim):
    contexts = [1, 5, 16, 17, 40, 130, 300]
    q, cache_k, cache_v, tables = _paged_setup(contexts, n_heads, n_kv, head_dim)
    reference = one_layer(ReferenceBackend, cache_k, cache_v)
    meta = reference.build_metadata([1] * len(contexts), contexts, tables)
    ref = reference.forward(q, cache_k, cache_v, meta)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    ours = paged_decode_attention(q, cache_k, cache_v, padded, torch.tensor(contexts))
    assert_close(ours, ref)


def test_paged_decode_attention_propagates_nan_in_the_cache_of_that_sequence_only():
    contexts = [20, 20]
    q, cache_k, cache_v, tables = _paged_setup(contexts, 4, 2, 32)
    cache_v[tables[1][0], 3, 1, 0] = float("nan")
    out = paged_decode_attention(q, cache_k, cache_v, torch.tensor(tables), torch.tensor(contexts))
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1, 2:, 0]).all()  # the heads reading KV head 1


def _planned_against_reference(q_lens, contexts, n_heads, n_kv, head_dim, seed=3, edit=None):
    """The CPU backend (the engine's planned attention) and the reference on the same inputs."""
    _, cache_k, cache_v, tables = _paged_setup(contexts, n_heads, n_kv, head_dim, seed=seed)
    if edit is not None:
        edit(cache_k, cache_v, tables)
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    cpu = one_layer(CpuBackend, cache_k, cache_v)
    with torch.inference_mode():  # as the model runs (the torch path reuses inference buffers)
        ours = cpu.forward(q, cache_k, cache_v, cpu.build_metadata(q_lens, contexts, tables))
    reference = one_layer(ReferenceBackend, cache_k, cache_v)
    ref = reference.forward(q, cache_k, cache_v, reference.build_metadata(q_lens, contexts, tables))
    return ours, ref


def test_the_cpu_backend_uses_the_kernels_and_agrees_with_the_reference(monkeypatch):
    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(
            cpu_kernels, name, lambda *a, name=name, real=real: calls.append(name) or real(*a)
        )
    # Decodes mixed with prefill chunks, one of them part-way through its context.
    ours, ref = _planned_against_reference([1, 7, 1, 12], [33, 7, 64, 40], 6, 2, 32)
    assert calls == ["paged_decode_attention", "paged_prefill_attention"]
    assert_close(ours, ref)


# Chunks from position 0 and part-way through (prefix hits, chunked prefill), query lengths
# that leave partial 6-row tiles, contexts across block boundaries; GQA groups 3, 1, 4, 4.
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim"), [(9, 3, 64), (8, 8, 64), (8, 2, 128), (4, 1, 16)]
)
def test_paged_prefill_attention_equals_the_torch_backend(n_heads, n_kv, head_dim):
    q_lens, contexts = [2, 17, 1, 5, 64, 300], [2, 17, 9, 37, 200, 300]
    ours, ref = _planned_against_reference(q_lens, contexts, n_heads, n_kv, head_dim)
    assert_close(ours, ref)


def test_prefill_attention_is_causal_even_for_nan_values_at_later_positions():
    def poison(cache_k, cache_v, tables):  # position 10 of the only sequence
        cache_k[tables[0][0], 10] = float("nan")
        cache_v[tables[0][0], 10] = float("nan")

    ours, _ = _planned_against_reference([20], [20], 6, 2, 32, edit=poison)
    assert torch.isfinite(ours[:10]).all()  # rows before position 10 never read it
    assert torch.isnan(ours[10:]).all()


def test_prefill_attention_needs_a_head_size_of_a_multiple_of_16():
    assert not one_layer(
        CpuBackend, torch.zeros(1, 16, 1, 24), torch.zeros(1, 16, 1, 24)
    ).prefill_kernel
    ours, ref = _planned_against_reference([5, 9], [5, 20], 4, 1, 24)  # the torch prefill
    assert_close(ours, ref)


@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (300, 576), (2, 3, 40)])
def test_rms_norm_equals_the_reference_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, weight = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), ref)


@pytest.mark.parametrize(("rows", "hidden"), [(1, 1), (1, 7), (3, 8), (2, 4100), (33, 1536)])
def test_silu_mul_equals_the_reference_formula(rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    gate_up = torch.randn(rows, 2 * hidden, generator=g) * 6
    gate_up[0, 0] = -100.0  # far in the saturated tail: silu is ~0 there, not NaN
    ref = TorchOps().silu_mul(gate_up)  # the torch twin
    assert_close(cpu_kernels.silu_mul(gate_up), ref)


def test_elementwise_kernels_propagate_nan():
    x = torch.randn(3, 64)
    x[1, 7] = float("nan")
    y = cpu_kernels.rms_norm(x, torch.ones(64), 1e-5)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    gate_up = torch.tensor([[float("nan"), 1.0] * 8 + [1.0] * 16])
    assert torch.isnan(cpu_kernels.silu_mul(gate_up)[0, ::2]).all()


@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(1, 9, 64), (37, 3, 64), (600, 8, 128)])
def test_rotary_equals_the_complex_product_in_place(tokens, heads, head_dim):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, heads, head_dim, generator=g)
    angles = torch.rand(tokens, head_dim // 2, generator=g) * 100
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    exact = torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * freqs_cis.cdouble()[:, None]
    out = cpu_kernels.rotary_(x, freqs_cis)
    assert out is x
    assert_close(out, torch.view_as_real(exact).flatten(-2))
    with pytest.raises(ValueError, match="does not fit"):
        cpu_kernels.rotary_(x, freqs_cis[:, :-1].contiguous())


def test_rotary_of_the_q_and_k_heads_of_fused_qkv_rows_leaves_v_alone():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g)  # 4 Q heads, 2 K heads, 2 V heads
    before = qkv.clone()
    angles = torch.rand(5, 8, generator=g) * 100
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    qk = qkv[:, : 6 * 16].view(5, 6, 16)  # strided: each row skips the V heads
    cpu_kernels.rotary_(qk, freqs_cis)
    ref = TorchOps().rotary(before[:, : 6 * 16].view(5, 6, 16), freqs_cis)
    assert_close(qkv[:, : 6 * 16].reshape(5, 6, 16), ref)
    assert torch.equal(qkv[:, 6 * 16 :], before[:, 6 * 16 :])


def test_write_kv_equals_index_copy_and_refuses_slots_outside_the_cache():
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = torch.zeros(4, 16, 2, 32), torch.zeros(4, 16, 2, 32)
    k, v = torch.randn(5, 2, 32, generator=g), torch.randn(5, 2, 32, generator=g)
    slots = torch.tensor([63, 0, 17, 18, 40])
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    ref_k.view(-1, 2, 32).index_copy_(0, slots, k)
    ref_v.view(-1, 2, 32).index_copy_(0, slots, v)
    cpu_kernels.write_kv(cache_k, cache_v, k, v, slots)
    assert torch.equal(cache_k, ref_k) and torch.equal(cache_v, ref_v)
    with pytest.raises(IndexError, match="64 slots"):
        cpu_kernels.write_kv(cache_k, cache_v, k * 2, v * 2, torch.tensor([1, 2, 3, 4, 64]))
    assert torch.equal(cache_k, ref_k)  # nothing written
