"""Run a model directly on flat steps through an attention backend (no engine)."""

from __future__ import annotations

import random

import torch

from nucleus.attention import AttentionBackend, KVCache, ReferenceBackend


def cpu_backend(
    config, num_blocks: int, block_size: int, backend: type[AttentionBackend] = ReferenceBackend
) -> AttentionBackend:
    """A float32 CPU cache of `num_blocks` blocks behind `backend` (the reference by default)."""
    return backend(KVCache.allocate(config, num_blocks, block_size, torch.float32, "cpu"))


def step_logits(
    model, backend: AttentionBackend, seqs: list[tuple[list[int], int, list[int]]]
) -> torch.Tensor:
    """Logits of every token of one flat step: each entry is (new token ids, tokens already
    cached, block table)."""
    meta = backend.build_metadata(
        [len(ids) for ids, _, _ in seqs],
        [cached + len(ids) for ids, cached, _ in seqs],
        [table for _, _, table in seqs],
    )
    tokens = torch.tensor([t for ids, _, _ in seqs for t in ids])
    positions = torch.tensor([cached + j for ids, cached, _ in seqs for j in range(len(ids))])
    return model.compute_logits(model(tokens, positions, backend, meta))


def paged_cache(
    contexts, n_kv, head_dim, *, block_size=16, dtype=torch.float32, device="cpu", seed=0
):
    """One layer's random K/V caches `(blocks, block_size, n_kv, head_dim)` holding sequences of
    `contexts` tokens in shuffled blocks (plus spare ones); returns the caches and block tables."""
    rng = random.Random(seed)
    needed = [-(-c // block_size) for c in contexts]
    ids = list(range(sum(needed) + 3))
    rng.shuffle(ids)
    tables, start = [], 0
    for nb in needed:
        tables.append(ids[start : start + nb])
        start += nb
    g = torch.Generator().manual_seed(seed)
    shape = (len(ids), block_size, n_kv, head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return k.to(device, dtype), v.to(device, dtype), tables
