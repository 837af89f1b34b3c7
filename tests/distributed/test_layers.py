"""The split table: shards, merges and re-shards as fairscale cut Meta's checkpoints.

Oracles: the pieces `write_meta_checkpoint` writes (fairscale's layout, reference-semantics 1.4:
`torch.chunk` along dim 0 for column-parallel weights and the embedding, dim 1 for row-parallel
ones), Meta's `llama-models` re-sharding rule for fewer KV heads than ranks (each KV head's rows
repeated before chunking), and the full tensors themselves: every comparison is exact.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import GQA8, KV1, Shape, random_meta_weights, write_meta_checkpoint

from nucleus.config import ConfigError, ModelConfig
from nucleus.distributed import Split, TensorParallel, check_shardable, checkpoint_layout
from nucleus.loaders import build_transformer
from nucleus.loaders.meta import load_meta_checkpoint
from nucleus.model import Transformer


def _config(shape: Shape) -> ModelConfig:
    return ModelConfig.from_meta_params(shape.meta_params())


@pytest.mark.parametrize("units, world", [(8, 2), (8, 8), (16, 4), (2, 4), (1, 2), (4, 8)])
def test_shards_merge_back_and_replicate_units_as_llama_models(units, world):
    full = torch.arange(units * 3 * 5).view(units * 3, 5)
    split = Split(0, units)
    shards = [split.shard(full, r, world) for r in range(world)]
    if units >= world:  # fairscale: equal chunks
        expected = full.chunk(world)
    else:  # llama-models: each unit's rows repeated world/units times, then chunked
        expected = full.view(units, 3, 5).repeat_interleave(world // units, 0).view(-1, 5)
        expected = expected.chunk(world)
    for shard, want in zip(shards, expected, strict=True):
        assert torch.equal(shard, want)
    assert torch.equal(split.merge(shards), full)


def test_row_split_cuts_columns():
    full = torch.arange(4 * 6).view(4, 6)
    split = Split(1, 3)
    assert torch.equal(split.shard(full, 1, 3), full[:, 2:4])
    assert torch.equal(split.merge([split.shard(full, r, 3) for r in range(3)]), full)


def test_layout_matches_meta_shard_files(tmp_path):
    """Each rank's piece, cut by the model's table, is the piece fairscale wrote for that rank."""
    weights = random_meta_weights(GQA8, seed=1)
    write_meta_checkpoint(tmp_path, GQA8, weights, shards=4)
    config, shards = load_meta_checkpoint(tmp_path)
    with torch.device("meta"):
        layout = checkpoint_layout(Transformer(config))
    assert set(layout) == set(weights)
    for name, slot in layout.items():
        assert slot.shape == tuple(weights[name].shape), name
        for rank in range(4):
            assert torch.equal(slot.split.shard(weights[name], rank, 4), shards.shards[rank][name])


@pytest.mark.parametrize("shape, world", [(GQA8, 2), (GQA8, 4), (KV1, 2), (KV1, 4)])
def test_a_rank_holds_its_heads_and_rows(shape, world):
    """A rank's model, built without a group, holds exactly its piece of every weight: its Q heads
    and their KV head(s) stacked in `wqkv`, its FFN rows, its vocabulary rows."""
    weights = random_meta_weights(shape, seed=2)
    config, hd, rank = _config(shape), shape.head_dim, world - 1
    tp = TensorParallel(rank, world)
    model = build_transformer(config, weights, device="cpu", dtype=torch.float32, tp=tp)
    q, kv = config.n_heads // world, max(config.n_kv_heads // world, 1)
    kv_first = rank * config.n_kv_heads // world
    attn = model.layers[1].attention
    assert (attn.n_heads, attn.n_kv_heads) == (q, kv)
    w = "layers.1.attention."
    expected = torch.cat(
        [
            weights[w + "wq.weight"][rank * q * hd : (rank + 1) * q * hd],
            weights[w + "wk.weight"][kv_first * hd : (kv_first + kv) * hd],
            weights[w + "wv.weight"][kv_first * hd : (kv_first + kv) * hd],
        ]
    )
    assert torch.equal(attn.wqkv.weight, expected)
    assert torch.equal(attn.wo.weight, weights[w + "wo.weight"][:, rank * q * hd :][:, : q * hd])
    rows = config.vocab_size // world
    emb = weights["tok_embeddings.weight"][rank * rows : (rank + 1) * rows]
    assert torch.equal(model.tok_embeddings.weight, emb)
    ffn = config.ffn_hidden_dim // world
    w2 = weights["layers.0.feed_forward.w2.weight"][:, rank * ffn : (rank + 1) * ffn]
    assert torch.equal(model.layers[0].feed_forward.w2.weight, w2)


@pytest.mark.parametrize(
    "changes, world, match",
    [
        ({"n_heads": 6, "n_kv_heads": 2}, 4, "n_heads"),
        ({"n_kv_heads": 3, "n_heads": 6}, 2, "n_kv_heads"),
        ({"vocab_size": 1001}, 2, "vocab_size"),
    ],
)
def test_unshardable_models_are_refused(changes, world, match):
    config = _config(GQA8).replace(**changes)
    with pytest.raises(ConfigError, match=match):
        check_shardable(config, world)
