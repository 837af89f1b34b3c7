"""Hugging Face directories saved by `transformers` itself, loaded into nucleus's model.

Oracle: the `transformers` LlamaForCausalLM that wrote the directory. Tolerance: fp32, 1e-5 relative.
Covers Llama 3, 3.1 (llama3 RoPE scaling, factor 8) and 3.2-style (tied embeddings, factor 32),
single-file and sharded safetensors.
"""

import json

import pytest
import torch
from checkpoints import LLAMA3, LLAMA31, LLAMA32, hf_logits, hf_model, random_meta_weights, rel_err
from steps import cpu_backend, step_logits

from nucleus.loaders import CheckpointError, build_transformer
from nucleus.loaders.hf import load_hf_checkpoint


def nucleus_logits(model_dir, ids):
    config, weights = load_hf_checkpoint(model_dir)
    model = build_transformer(config, weights, device="cpu", dtype=torch.float32)
    return config, step_logits(model, cpu_backend(config, 4, 16), [(list(ids), 0, [0, 1, 2, 3])])


@pytest.mark.parametrize(
    ("shape", "shard"),
    [(LLAMA3, False), (LLAMA3, True), (LLAMA31, False), (LLAMA32, True)],
    ids=["3.0", "3.0-sharded", "3.1", "3.2-tied-sharded"],
)
def test_logits_match_the_model_that_saved_them(tmp_path, shape, shard):
    oracle = hf_model(shape, random_meta_weights(shape, seed=11))
    oracle.save_pretrained(tmp_path, max_shard_size="20MB" if shard else "10GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    ids = torch.randint(0, 128256, (33,), generator=torch.Generator().manual_seed(0)).tolist()
    config, logits = nucleus_logits(tmp_path, ids)
    assert config.tie_embeddings == shape.tied
    if shape.scaled_rope:
        assert config.rope_scaling.factor == shape.rope_factor  # read, not hard-coded to 8
    assert rel_err(logits, hf_logits(oracle, ids)) <= 1e-5


def test_missing_weights_file(tmp_path):
    hf_model(LLAMA3, random_meta_weights(LLAMA3, seed=1)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_not_a_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a Llama-architecture model"):
        load_hf_checkpoint(tmp_path)


def test_corrupt_safetensors(tmp_path):
    hf_model(LLAMA3, random_meta_weights(LLAMA3, seed=1)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_hf_checkpoint(tmp_path)
