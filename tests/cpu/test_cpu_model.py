"""`CpuModel`: the C forward pass over a GGUF's own blocks, against the float32 torch model.

Oracle: `nucleus.model.Transformer` on the same file's dequantized weights in float32 (itself
checked against transformers in tests/loaders/test_gguf.py). The CPU path computes with 8-bit
activations and a float16 KV cache, as llama.cpp does, so its logits differ from the float32
model's by the quantization of the activations, within the bounds docs/cpu.md states:
- the default model: every logit within 3.0 of the float32 model's (the worst seen over the 1,060
  positions of the 20 recorded chat prompts: 2.3; llama.cpp's own: up to about 1.8), and the same
  top token wherever the float32 model's top two logits are more than 0.5 apart (the widest margin
  seen at a disagreement: 0.17);
- small random models: within 10% of the largest logit for quantized matrices (1-5% seen), 0.1%
  for float ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import HEAD_DIM, VOCAB, write_llama_gguf
from steps import cpu_backend, step_logits

from nucleus.config import RopeScaling
from nucleus.cpu.model import CpuModel
from nucleus.cpu.runner import CpuRunner
from nucleus.engine.sequence import Sequence
from nucleus.loaders import build_transformer, load_model_files
from nucleus.loaders.gguf import GGUFWeights
from nucleus.loaders.gguf_file import open_gguf
from nucleus.model import rope_frequencies
from nucleus.sampling_params import SamplingParams

DATA = Path(__file__).parents[1] / "data" / "smollm2_llamacpp_greedy.json"
GREEDY = SamplingParams(temperature=0)


def sequence(ids: list[int], blocks: list[int]) -> Sequence:
    seq = Sequence("s", ids, GREEDY)
    seq.block_table = list(blocks)
    return seq


def float32_logits(model, config, ids: list[int]) -> np.ndarray:
    blocks = -(-len(ids) // 16)
    with torch.inference_mode():
        backend = cpu_backend(config, blocks, 16)
        return step_logits(model, backend, [(ids, 0, list(range(blocks)))]).numpy()


@pytest.fixture(scope="module")
def default_model():
    files = load_model_files(None)
    reference = build_transformer(
        files.config, GGUFWeights(files.gguf), device="cpu", dtype=torch.float32
    )
    return files, reference, files.build_cpu_model()


def test_default_model_logits_are_within_the_stated_bound(default_model):
    files, reference, model = default_model
    records = json.loads(DATA.read_text())["records"][:4]
    runner = CpuRunner(model, num_kv_blocks=64)
    for i, record in enumerate(records):
        ids = record["prompt_ids"] + record["llamacpp_ids"][:16]
        n = len(record["prompt_ids"])
        seq = sequence(ids, range(8 * i, 8 * i + 8))
        hidden = [runner.forward([seq], [0], [n])]  # the prompt, then token by token
        hidden += [runner.forward([seq], [j], [1]) for j in range(n, len(ids))]
        ours = model.logits(np.concatenate(hidden))
        ref = float32_logits(reference, files.config, ids)
        assert np.abs(ours - ref).max() <= 3.0
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.5
        assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()


# Each small model takes one form for its layers' matrices (the embedding and head as noted).
FORMS = {
    "Q4_0": ("Q4_0", "Q4_0"),
    "Q4_1": ("Q4_1", "Q8_0"),
    "Q8_0": ("Q8_0", "Q8_0"),
    "Q4_K": ("Q8_0", "Q6_K"),
    "Q5_K": ("Q4_K", "Q5_K"),
    "Q6_K": ("Q6_K", "Q6_K"),
    "F16": ("F16", "F16"),
    "BF16": ("BF16", "F32"),
    "F32": ("F32", "F32"),
}


def small_model(path: Path, form: str, **kwargs) -> Path:
    embedding, head = FORMS[form]
    types = {"token_embd.weight": embedding, "output.weight": head}
    for i in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            types[f"blk.{i}.{t}.weight"] = form
    write_llama_gguf(path, types=types, **kwargs)
    return path


@pytest.mark.parametrize("form", list(FORMS))
def test_small_models_of_every_form_match_the_float32_model(tmp_path, form):
    file = open_gguf(small_model(tmp_path / f"{form}.gguf", form))
    reference = build_transformer(file.config, GGUFWeights(file), device="cpu", dtype=torch.float32)
    model = CpuModel(file)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, 20)]
    ours = model.logits(
        CpuRunner(model, num_kv_blocks=4).forward([sequence(ids, [0, 1])], [0], [20])
    )
    ref = float32_logits(reference, file.config, ids)
    bound = 1e-3 if form in ("F16", "BF16", "F32") else 0.1
    assert np.abs(ours - ref).max() <= bound * np.abs(ref).max()


def test_tied_embeddings_and_llama31_rope_factors(tmp_path):
    """The C model divides the base frequencies by the file's rope_freqs, as llama.cpp does; the
    torch model recomputes them from the scaling recovered from them."""
    base = rope_frequencies(HEAD_DIM, 500000.0, None).double()
    factors = (base / rope_frequencies(HEAD_DIM, 500000.0, RopeScaling()).double()).numpy()
    path = small_model(tmp_path / "tied.gguf", "Q8_0", tied=True, rope_factors=factors)
    file = open_gguf(path)
    assert file.config.tie_embeddings and file.config.rope_scaling is not None
    reference = build_transformer(file.config, GGUFWeights(file), device="cpu", dtype=torch.float32)
    model = CpuModel(file)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, VOCAB, 24)]
    ours = model.logits(
        CpuRunner(model, num_kv_blocks=4).forward([sequence(ids, [2, 0])], [0], [24])
    )
    ref = float32_logits(reference, file.config, ids)
    assert np.abs(ours - ref).max() <= 0.1 * np.abs(ref).max()


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    return CpuModel(open_gguf(small_model(tmp_path_factory.mktemp("q4") / "m.gguf", "Q4_1")))


def test_a_sequence_computes_the_same_bits_alone_or_in_a_batch(q4):
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(0, VOCAB, n)] for n in (5, 17, 9)]
    alone, together = CpuRunner(q4, num_kv_blocks=16), CpuRunner(q4, num_kv_blocks=16)
    seqs = [sequence(p, [2 * i, 2 * i + 1]) for i, p in enumerate(prompts)]
    for seq in seqs:
        alone.forward([seq], [0], [len(seq)])
    together.forward(seqs, [0, 0, 0], [len(s) for s in seqs])
    for step in range(3):  # decode rows: each alone, then the three in one step
        for seq in seqs:
            seq.token_ids.append(7 + step)
        solo = [alone.forward([s], [len(s) - 1], [1]) for s in seqs]
        batch = together.forward(seqs, [len(s) - 1 for s in seqs], [1, 1, 1])
        assert np.array_equal(np.concatenate(solo), batch)


def test_a_prompt_in_chunks_gives_the_same_logits_as_at_once(q4):
    ids = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, 40)]
    once = CpuRunner(q4, num_kv_blocks=8).forward([sequence(ids, [0, 1, 2])], [0], [40])
    chunked = CpuRunner(q4, num_kv_blocks=8)
    seq = sequence(ids, [0, 1, 2])
    parts = [chunked.forward([seq], [a], [b - a]) for a, b in ((0, 13), (13, 14), (14, 40))]
    assert np.allclose(np.concatenate(parts), once, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("ids", "blocks"),
    [([VOCAB], [0]), ([-1], [0]), ([1, 2], [9])],
    ids=["token past the vocabulary", "negative token", "block past the cache"],
)
def test_a_bad_step_is_refused_before_it_runs(q4, ids, blocks):
    runner = CpuRunner(q4, num_kv_blocks=4)
    with pytest.raises(IndexError, match="out of range"):
        runner.forward([sequence(ids, blocks)], [0], [len(ids)])
    assert not runner.k_cache.any()  # nothing was written
