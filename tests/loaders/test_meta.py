"""Meta checkpoints: shards merged as fairscale split them (or read rank by rank), strict and safe
loading.

Oracle: the unsharded weights themselves (merging must give them back bit for bit) and
`transformers` logits on the same weights (fp32, 1e-5 relative).
"""

import pickle

import pytest
import torch
from checkpoints import (
    LLAMA3,
    hf_logits,
    hf_model,
    random_meta_weights,
    rel_err,
    write_meta_checkpoint,
)
from steps import cpu_backend, step_logits

from nucleus.distributed import checkpoint_layout
from nucleus.loaders import CheckpointError, build_transformer
from nucleus.loaders.meta import load_meta_checkpoint
from nucleus.model import Transformer


@pytest.fixture(scope="module")
def weights():
    return random_meta_weights(LLAMA3, seed=5)


@pytest.mark.parametrize("shards", [1, 2])
def test_shards_merge_back_to_the_full_weights(tmp_path, weights, shards):
    write_meta_checkpoint(tmp_path, LLAMA3, weights, shards=shards)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == shards
    config, loaded = load_meta_checkpoint(tmp_path)
    assert config.n_kv_heads == 2 and config.ffn_hidden_dim == LLAMA3.ffn_hidden
    assert set(loaded) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_rank_reads_its_own_shard_or_a_reshard(tmp_path, weights):
    """With as many ranks as files, rank 1's tensors are file 01's own (no copy); with 4 ranks
    for 2 files, rank 1's are cut from the merged tensors (KV heads replicated)."""
    write_meta_checkpoint(tmp_path, LLAMA3, weights, shards=2)
    config, shards = load_meta_checkpoint(tmp_path)
    with torch.device("meta"):
        layout = checkpoint_layout(Transformer(config))
    for name, slot in layout.items():
        assert shards.local(name, slot, 1, 2) is shards.shards[1][name]
        assert torch.equal(shards.local(name, slot, 1, 4), slot.split.shard(weights[name], 1, 4))


def test_merged_shards_give_transformers_logits(tmp_path, weights):
    write_meta_checkpoint(tmp_path, LLAMA3, weights, shards=2)
    config, loaded = load_meta_checkpoint(tmp_path)
    model = build_transformer(config, loaded, device="cpu", dtype=torch.float32)
    ids = list(range(1000, 1020))
    logits = step_logits(model, cpu_backend(config, 2, 16), [(list(ids), 0, [0, 1])])
    assert rel_err(logits, hf_logits(hf_model(LLAMA3, weights), ids)) <= 1e-5


def test_llama31_params_are_accepted_and_honoured(tmp_path, weights):
    from checkpoints import LLAMA31

    write_meta_checkpoint(tmp_path, LLAMA31, weights)
    config, _ = load_meta_checkpoint(tmp_path)
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0


def test_no_checkpoint_files(tmp_path, weights):
    write_meta_checkpoint(tmp_path, LLAMA3, weights)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint files"):
        load_meta_checkpoint(tmp_path)


def test_missing_params_json(tmp_path):
    with pytest.raises(CheckpointError, match=r"no params\.json"):
        load_meta_checkpoint(tmp_path)


def test_params_json_missing_a_key(tmp_path, weights):
    write_meta_checkpoint(tmp_path, LLAMA3, weights)
    (tmp_path / "params.json").write_text('{"dim": 128}')
    with pytest.raises(CheckpointError, match=r"params\.json: missing required key 'n_heads'"):
        load_meta_checkpoint(tmp_path)


def test_pickled_code_is_refused(tmp_path, weights):
    """`weights_only=True`: a checkpoint that would run code on load is rejected."""
    write_meta_checkpoint(tmp_path, LLAMA3, weights)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "consolidated.00.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_meta_checkpoint(tmp_path)


def test_corrupt_file(tmp_path, weights):
    write_meta_checkpoint(tmp_path, LLAMA3, weights)
    (tmp_path / "consolidated.00.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth"):
        load_meta_checkpoint(tmp_path)
