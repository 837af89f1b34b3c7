"""The Transformer against Hugging Face `transformers` `LlamaForCausalLM` on the same random weights.

Oracle: `transformers` (rotate-half RoPE, its own attention and cache), fed the weights through
the Q/K permutation of its own conversion script. Tolerance: fp32, relative error <= 1e-5.
"""

import pytest
import torch
from checkpoints import LLAMA3, LLAMA31, LLAMA32, hf_logits, hf_model, random_meta_weights, rel_err
from steps import cpu_backend, step_logits

from nucleus.attention import ReferenceBackend, TorchBackend
from nucleus.attention.cpu import CpuBackend
from nucleus.config import ModelConfig
from nucleus.loaders import CheckpointError, build_transformer
from nucleus.model import rope_frequencies

TOL = 1e-5
BLOCK = 16


def nucleus_model(shape, weights):
    config = ModelConfig.from_meta_params(shape.meta_params())
    if shape.tied:
        config = config.replace(tie_embeddings=True)
    if shape.scaled_rope:
        from nucleus.config import RopeScaling

        config = config.replace(rope_scaling=RopeScaling(factor=shape.rope_factor))
    return build_transformer(config, weights, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", params=[LLAMA3, LLAMA31, LLAMA32], ids=["3.0", "3.1", "3.2"])
def pair(request):
    weights = random_meta_weights(request.param, seed=0)
    return nucleus_model(request.param, weights), hf_model(request.param, weights)


# Every attention backend that runs on the CPU (the C kernels' one only with a compiler).
BACKENDS = [ReferenceBackend, TorchBackend, CpuBackend]


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend_cls(request):
    from nucleus.kernels import cpu as cpu_kernels

    if request.param is CpuBackend and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    return request.param


def test_prefill_logits_match_transformers(pair, backend_cls):
    model, oracle = pair
    ids = torch.randint(0, 128256, (77,), generator=torch.Generator().manual_seed(1)).tolist()
    backend = cpu_backend(model.config, 8, BLOCK, backend_cls)
    ours = step_logits(model, backend, [(ids, 0, [3, 1, 4, 0, 2])])
    assert rel_err(ours, hf_logits(oracle, ids)) <= TOL


def test_step_by_step_decode_matches_transformers(pair, backend_cls):
    model, oracle = pair
    ids = torch.randint(0, 128256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = hf_logits(oracle, ids)
    backend = cpu_backend(model.config, 4, BLOCK, backend_cls)
    table = [2, 0, 3]
    prefix = 7
    ours = [step_logits(model, backend, [(ids[:prefix], 0, table)])]
    for pos in range(prefix, len(ids)):
        ours.append(step_logits(model, backend, [(ids[pos : pos + 1], pos, table)]))
    assert rel_err(torch.cat(ours), expected) <= TOL


def test_mixed_flat_batch_equals_each_sequence_alone(pair, backend_cls):
    """Prefill chunks and decodes of different sequences share one step without mixing."""
    model, oracle = pair
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 128256, (30,), generator=g).tolist()
    b = torch.randint(0, 128256, (21,), generator=g).tolist()
    backend = cpu_backend(model.config, 8, BLOCK, backend_cls)
    step_logits(model, backend, [(a[:29], 0, [0, 1])])
    step_logits(model, backend, [(b[:5], 0, [2, 3])])
    # Step: a decodes its 30th token, b prefills a chunk of 16 more.
    out = step_logits(model, backend, [(a[29:], 29, [0, 1]), (b[5:21], 5, [2, 3])])
    assert rel_err(out[:1], hf_logits(oracle, a)[29:]) <= TOL
    assert rel_err(out[1:], hf_logits(oracle, b)[5:21]) <= TOL


def test_llama31_rope_scaling_matches_reference_constants():
    """For hd=128, theta=5e5: indices 0-28 unchanged, 29-34 interpolated, 35-63 divided by 8."""
    from nucleus.config import RopeScaling

    plain = rope_frequencies(128, 500000.0, None)
    scaled = rope_frequencies(128, 500000.0, RopeScaling())
    assert torch.equal(scaled[:29], plain[:29])
    assert torch.allclose(scaled[35:], plain[35:] / 8)
    assert ((scaled[29:35] < plain[29:35]) & (scaled[29:35] > plain[29:35] / 8)).all()


def test_build_names_missing_and_unexpected_keys():
    weights = random_meta_weights(LLAMA3, seed=0)
    config = ModelConfig.from_meta_params(LLAMA3.meta_params())
    broken = dict(weights)
    del broken["layers.1.attention.wk.weight"]
    broken["layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        build_transformer(config, broken, device="cpu", dtype=torch.float32)
    assert "layers.1.attention.wk.weight" in str(e.value)
    assert "layers.9.extra.weight" in str(e.value)


def test_build_names_a_wrong_shape():
    weights = random_meta_weights(LLAMA3, seed=0)
    weights["norm.weight"] = torch.ones(7)
    config = ModelConfig.from_meta_params(LLAMA3.meta_params())
    with pytest.raises(CheckpointError, match=r"norm.weight.*\(7,\)"):
        build_transformer(config, weights, device="cpu", dtype=torch.float32)
