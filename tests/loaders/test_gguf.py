"""GGUF loading: dequantization against `gguf.quants`, metadata, errors, and the default model.

Oracles: `gguf.quants.dequantize` (llama.cpp's own Python package) for every supported type on
random blocks; `transformers`' GGUF loader for the whole default model. transformers undoes
llama.cpp's Q/K permutation (into HF's rotate-half order), so our `wq`/`wk` must equal its
`q_proj`/`k_proj` after HF's rotate-half -> interleaved conversion, and must differ without it:
that pins the row order. The logits of `nucleus.model` on our weights match transformers' too.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_files import (
    DIM,
    FFN,
    HEAD_DIM,
    LAYERS,
    SUPPORTED,
    VOCAB,
    random_blocks,
    write_llama_gguf,
)
from steps import cpu_backend, step_logits

from nucleus.config import RopeScaling
from nucleus.loaders import gguf as gguf_loader
from nucleus.loaders.gguf import (
    DEQUANTIZERS,
    GGUFError,
    dequantize,
    load_gguf_checkpoint,
    read_gguf_metadata,
)


def assert_bitwise_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert ours.shape == ref_t.shape
    nan = torch.isnan(ref_t)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), ref_t[~nan].view(torch.int32))


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_dequantize_random_blocks_matches_gguf_quants(type_name):
    # F32/F16/BF16 random bytes cover subnormals, infinities and NaNs too
    raw = random_blocks(type_name, 512, seed=len(type_name) * 7 + ord(type_name[-1]))
    block_values = gguf.GGML_QUANT_SIZES[Q[type_name]][0]
    shape = (8, 512 // 8 * block_values)
    ref = gguf.quants.dequantize(raw.reshape(8, -1), Q[type_name])
    assert_bitwise_equal(dequantize(raw, type_name, shape), ref)


@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_quantized_floats_matches_gguf_quants(type_name):
    values = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q[type_name])
    ref = gguf.quants.dequantize(raw, Q[type_name])
    ours = dequantize(raw, type_name, (16, 256))
    assert_bitwise_equal(ours, ref)
    assert torch.allclose(ours, torch.from_numpy(values), atol=0.3)  # and it is the data


def test_dequantize_in_chunks_is_the_same(monkeypatch):
    raw = random_blocks("Q6_K", 37, seed=5)
    whole = dequantize(raw, "Q6_K", (37 * 256,))
    monkeypatch.setattr(gguf_loader, "_CHUNK_VALUES", 256 * 4)  # 10 chunks, the last partial
    done = []
    chunked = dequantize(raw, "Q6_K", (37, 256), progress=done.append)
    assert torch.equal(chunked.reshape(-1), whole)
    assert len(done) == 10 and sum(done) == 37 * 256 * 4


def test_dequantize_rejects_a_wrong_size():
    with pytest.raises(ValueError, match="Q4_0 data holds 64 values"):
        dequantize(random_blocks("Q4_0", 2, 0), "Q4_0", (65,))


def _meta(name: str) -> str:
    return gguf_loader.meta_name(name)


def test_every_supported_type_loads_as_gguf_quants_dequantizes(tmp_path):
    cycle = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
    names = [
        f"blk.{i}.{t}.weight"
        for i in range(LAYERS)
        for t in ("attn_q", "attn_k", "ffn_up", "ffn_down")
    ]
    types = {name: cycle[j % len(cycle)] for j, name in enumerate(names)}
    types["token_embd.weight"] = "Q6_K"
    types["output.weight"] = "Q8_0"
    path = tmp_path / "tiny.gguf"
    written = write_llama_gguf(path, types=types)
    config, weights = load_gguf_checkpoint(path)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (DIM, LAYERS, 4, 2)
    assert (config.vocab_size, config.ffn_hidden_dim, config.head_dim) == (VOCAB, FFN, HEAD_DIM)
    assert config.rope_theta == 500000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == 4096 and not config.tie_embeddings
    assert math.isclose(config.norm_eps, 1e-5, rel_tol=1e-6)
    assert set(weights) == {_meta(n) for n in written}
    assert set(types.values()) == set(SUPPORTED) - {"F32"}
    for name, (raw, type_name) in written.items():
        ours = weights[_meta(name)]
        ref = gguf.quants.dequantize(raw, Q[type_name])
        assert_bitwise_equal(ours.reshape(ref.shape), ref)
        if ours.ndim == 2:
            assert ours.shape[1] == (FFN if "ffn_down" in name else DIM)


def test_tied_embeddings_and_views(tmp_path):
    path = tmp_path / "tied.gguf"
    write_llama_gguf(path, tied=True)
    config, weights = load_gguf_checkpoint(path)
    assert config.tie_embeddings and "output.weight" not in weights
    # F32 tensors are views of the copy-on-write mapping, not copies; writes do not reach the file
    norm = weights["norm.weight"]
    assert not norm.untyped_storage().resizable()  # numpy-owned memory: the mapping itself
    before = path.read_bytes()
    norm.add_(1.0)
    assert path.read_bytes() == before


def test_bf16_output_dtype(tmp_path):
    path = tmp_path / "q.gguf"
    written = write_llama_gguf(path, types={"blk.0.attn_q.weight": "Q4_K"})
    _, weights = load_gguf_checkpoint(path, dtype=torch.bfloat16)
    raw, _ = written["blk.0.attn_q.weight"]
    ref = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K)).to(torch.bfloat16)
    assert weights["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    assert torch.equal(weights["layers.0.attention.wq.weight"], ref)


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(),
        RopeScaling(factor=32.0),
        RopeScaling(factor=16.0, high_freq_factor=8.0, original_max_position_embeddings=4096),
    ],
    ids=["3.1", "3.2", "custom"],
)
def test_llama31_rope_scaling_recovered_from_rope_freqs(tmp_path, scaling):
    from nucleus.model import rope_frequencies

    base = rope_frequencies(HEAD_DIM, 500000.0, None).double()
    factors = (base / rope_frequencies(HEAD_DIM, 500000.0, scaling).double()).numpy()
    path = tmp_path / "scaled.gguf"
    original_ctx = scaling.original_max_position_embeddings
    write_llama_gguf(path, rope_factors=factors, original_ctx=original_ctx)
    config, weights = load_gguf_checkpoint(path)
    assert config.rope_scaling == scaling
    assert "rope_freqs.weight" not in weights


def test_rope_freqs_that_are_not_llama31_scaling_are_refused(tmp_path):
    factors = np.linspace(1.0, 3.0, HEAD_DIM // 2) ** 2
    path = tmp_path / "odd.gguf"
    write_llama_gguf(path, rope_factors=factors)
    with pytest.raises(GGUFError, match=r"odd\.gguf.*not Llama 3\.1-style"):
        load_gguf_checkpoint(path)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q5_0", "IQ4_NL"])
def test_unsupported_type_is_named(tmp_path, type_name):
    path = tmp_path / f"{type_name}.gguf"
    write_llama_gguf(path, types={"blk.1.ffn_gate.weight": type_name})
    with pytest.raises(
        GGUFError,
        match=rf"{type_name}\.gguf: tensor 'blk\.1\.ffn_gate\.weight' is of GGML type {type_name}",
    ):
        load_gguf_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model")
    with pytest.raises(GGUFError, match=r"model\.gguf: not a GGUF file"):
        load_gguf_checkpoint(path)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_metadata(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        load_gguf_checkpoint(tmp_path / "missing.gguf")


def test_truncated_gguf_file(tmp_path):
    path = tmp_path / "whole.gguf"
    write_llama_gguf(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GGUFError, match=r"cut\.gguf"):
        load_gguf_checkpoint(cut)


def test_not_a_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_llama_gguf(path, arch="gpt2")
    with pytest.raises(GGUFError, match=r"gpt2\.gguf: architecture 'gpt2' is not a Llama"):
        load_gguf_checkpoint(path)


def test_dequantizers_cover_the_issue_list():
    assert set(SUPPORTED) <= set(DEQUANTIZERS)


# ---- the default model -------------------------------------------------------------------------


def test_default_model_metadata_and_config(smollm2_gguf, smollm2_checkpoint):
    metadata = read_gguf_metadata(smollm2_gguf)
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    config, weights = smollm2_checkpoint
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.ffn_hidden_dim, config.head_dim) == (49152, 1536, 64)
    assert config.tie_embeddings and "output.weight" not in weights
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == 8192
    assert len(weights) == 2 + 9 * 30
    assert all(t.dtype == torch.float32 for t in weights.values())


@pytest.fixture(scope="module")
def transformers_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_default_model_weights_equal_transformers(smollm2_checkpoint, transformers_model):
    from nucleus.loaders.hf import meta_name, rotate_half_to_interleaved

    config, weights = smollm2_checkpoint
    seen = set()
    for hf_name, ref in transformers_model.state_dict().items():
        name = meta_name(hf_name)
        if name == "output.weight":  # transformers ties lm_head to the embedding
            assert torch.equal(ref, weights["tok_embeddings.weight"])
            continue
        assert name is not None, hf_name
        ours = weights[name]
        if name.endswith(("wq.weight", "wk.weight")):
            heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads
            # the GGUF holds Meta's interleaved order: exactly HF's rows, converted
            assert torch.equal(ours, rotate_half_to_interleaved(ref, heads)), name
            assert not torch.equal(ours, ref), name
        else:
            assert torch.equal(ours, ref), name
        seen.add(name)
    assert seen == set(weights)


@pytest.mark.slow
def test_default_model_logits_equal_transformers(smollm2_checkpoint, transformers_model):
    from nucleus.loaders import build_transformer

    config, weights = smollm2_checkpoint
    model = build_transformer(config, weights, device="cpu", dtype=torch.float32)
    ids = [1, 4093, 198, 19556, 905, 17, 216, 33, 34, 35, 2, 198, 1, 520, 9531, 198, 504, 3575]
    with torch.no_grad():
        ours = step_logits(model, cpu_backend(config, 2, 16), [(ids, 0, [1, 0])])
        ref = transformers_model(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_block_int8_form_of_q8_0_q4_0_q4_1_dequantizes_as_gguf_quants(tmp_path):
    # Oracle: gguf.quants (llama.cpp's own Python dequantizer), bit for bit.
    types = {
        "blk.0.attn_q.weight": "Q8_0",
        "blk.0.ffn_up.weight": "Q4_0",
        "blk.0.ffn_down.weight": "Q4_1",
        "blk.1.attn_k.weight": "Q4_K",  # not a block-int8 type: left to the float32 path
        "token_embd.weight": "Q8_0",
    }
    path = tmp_path / "blocks.gguf"
    written = write_llama_gguf(path, types=types)
    packed = gguf_loader.read_block_int8(path)
    # VOCAB (300) rows do not tile into panels of 16: the embedding stays float32 only
    assert set(packed) == {_meta(n) for n in types} - {"layers.1.attention.wk.weight"} - {
        "tok_embeddings.weight"
    }
    for name, weight in packed.items():
        gguf_name = next(n for n in written if _meta(n) == name)
        raw, type_name = written[gguf_name]
        ref = gguf.quants.dequantize(raw, Q[type_name])
        assert weight.shape == ref.shape
        # Equal values; the one bit pattern that may differ is the sign of a zero weight
        # (`d * 0` is -0.0 for a negative d, `d * 0 + 0` is +0.0), which no product can see.
        assert torch.equal(weight.dequantize(), torch.from_numpy(ref))


@pytest.mark.slow
def test_default_model_logits_through_the_cpu_kernels_equal_transformers(
    smollm2_gguf, smollm2_checkpoint, transformers_model
):
    # The default model's Q4_1/Q8_0 matrices run through nucleus.kernels (block-int8 products,
    # paged decode attention). Oracle: transformers on the same GGUF, prefill then decode steps.
    from nucleus.attention.cpu import CpuBackend
    from nucleus.kernels import cpu as cpu_kernels
    from nucleus.loaders import build_transformer

    if not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    config, weights = smollm2_checkpoint
    packed = gguf_loader.read_block_int8(smollm2_gguf)
    assert len(packed) == 1 + 7 * config.n_layers  # every matrix, and the tied Q8_0 head
    model = build_transformer(config, weights, device="cpu", dtype=torch.float32, block_int8=packed)
    assert model.output.block_int8 is packed["tok_embeddings.weight"]
    assert model.layers[0].attention.wqkv.block_int8 is not None  # Q, K and V fused
    ids = [1, 4093, 198, 19556, 905, 17, 216, 33, 34, 35, 2, 198, 1, 520, 9531, 198, 504, 3575]
    prompt, steps = ids[:10], ids[10:]
    backend = cpu_backend(config, 2, 16, CpuBackend)
    rows = [step_logits(model, backend, [(prompt, 0, [1, 0])])]
    for pos, token in enumerate(steps, start=len(prompt)):
        rows.append(step_logits(model, backend, [([token], pos, [1, 0])]))
    ours = torch.cat(rows)
    with torch.no_grad():
        ref = transformers_model(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_the_exact_cpu_model_keeps_no_float32_copy_of_its_block_matrices(smollm2_gguf):
    """`ModelFiles.build_model` on the CPU in float32: the Q4_1/Q8_0 matrices are multiplied as
    8-bit blocks and never dequantized (their dense weights stay on the meta device); the only
    float32 matrix is the embedding table, which the tied head shares."""
    from nucleus.kernels import cpu as cpu_kernels
    from nucleus.linear import Linear
    from nucleus.loaders import load_model_files

    if not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    model = load_model_files(smollm2_gguf).build_model(device="cpu", dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.block_int8 is not None for m in linears)
    assert all(m.weight.is_meta for m in linears if m is not model.output)
    dense = {id(p): p for p in model.parameters() if not p.is_meta}
    assert sum(p.numel() for p in dense.values()) < 29_000_000  # embedding (28.3M) and norms
