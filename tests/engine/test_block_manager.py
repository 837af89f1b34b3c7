"""The block pool: allocation, freeing, prefix caching by chained hash, LRU eviction."""

from __future__ import annotations

import pytest

from nucleus.engine import block_manager as bm_module
from nucleus.engine.block_manager import BlockManager
from nucleus.engine.sequence import Sequence
from nucleus.sampling_params import SamplingParams


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams())


def check(bm: BlockManager, live: list[Sequence]) -> None:
    """Reference counts equal the holders; free lists hold exactly the blocks nobody holds."""
    holders = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            holders[b] += 1
    assert holders == bm.ref_counts
    free = list(bm._free_empty) + list(bm._free_cached)
    assert len(free) == len(set(free)), "a block is free twice"
    assert set(free) == {b for b in range(bm.num_blocks) if holders[b] == 0}
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h
    assert all(bm.block_hash[b] is not None for b in bm._free_cached)


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """Pretend a step computed `n` more tokens of `s`."""
    before = s.num_computed_tokens
    s.num_computed_tokens += n
    bm.cache_blocks(s, before)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a = seq(list(range(10)))
    assert bm.can_allocate(a, 10)
    bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    check(bm, [a])
    bm.free(a)
    bm.free(a)  # idempotent: nothing held, nothing freed
    assert a.block_table == [] and bm.num_free_blocks == 8
    check(bm, [])


def test_cannot_allocate_beyond_the_pool():
    bm = BlockManager(2, 4)
    a = seq(list(range(9)))
    assert not bm.can_allocate(a, 9)
    with pytest.raises(RuntimeError):
        bm.allocate(a, 9)
    check(bm, [])


def test_append_slots_grows_one_block_at_a_boundary():
    bm = BlockManager(4, 4)
    a = seq([1, 2, 3, 4])
    bm.allocate(a, 4)
    compute(bm, a, 4)
    a.append_token(5)
    assert bm.num_new_blocks(a, 1) == 1
    bm.append_slots(a, 1)
    assert len(a.block_table) == 2
    assert bm.num_new_blocks(a, 1) == 0
    check(bm, [a])


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    bm = BlockManager(16, 4)
    a = seq(list(range(12)))
    bm.allocate(a, 12)
    compute(bm, a, 12)
    b = seq(list(range(12)))  # identical: 3 full blocks, but one token must be left to compute
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    bm.allocate(b, 12 - 8, hits)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[a.block_table[0]] == 2
    check(bm, [a, b])
    c = seq([*range(4), 99, 5, 6, 7, 8, 9])  # second block differs: only the first is shared
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    bm.free(a)
    bm.free(b)
    check(bm, [])


def test_prefix_hit_only_for_identical_content_even_when_hashes_collide(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: b"same")
    bm = BlockManager(8, 2)
    a = seq([1, 2, 3])
    bm.allocate(a, 3)
    compute(bm, a, 3)
    assert bm.find_cached_prefix(seq([5, 6, 7])) == []  # same hash, other tokens: no hit
    assert bm.find_cached_prefix(seq([1, 2, 7])) == a.block_table[:1]


def test_freed_cached_blocks_are_revived_then_evicted_least_recent_first():
    bm = BlockManager(5, 2)
    a, b = seq([1, 2, 3]), seq([5, 6, 7])
    for s in (a, b):
        bm.allocate(s, 3)
        compute(bm, s, 3)
    a_first, b_first = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    check(bm, [])
    assert bm.num_free_blocks == 5
    # A revival takes a free cached block back.
    c = seq([1, 2, 9])
    hits = bm.find_cached_prefix(c)
    assert hits == [a_first]
    bm.allocate(c, 1, hits)
    check(bm, [c])
    # New blocks come from empty ones first, then evict the least recently freed cached one.
    d = seq([10, 11, 12, 13, 14])
    bm.allocate(d, 5)  # 3 blocks: 2 empty ones, then evicts b's block
    assert b_first in d.block_table
    assert bm.find_cached_prefix(seq([5, 6, 7])) == []
    assert bm.find_cached_prefix(seq([1, 2, 3])) == [a_first]
    check(bm, [c, d])


def test_same_content_computed_twice_keeps_one_cached_copy():
    bm = BlockManager(8, 2)
    a, b = seq([1, 2, 3]), seq([1, 2, 3])
    bm.allocate(a, 3)
    bm.allocate(b, 3)  # both miss: nothing cached yet
    compute(bm, a, 3)
    compute(bm, b, 3)
    assert len(bm.hash_to_block) == 1
    bm.free(a)
    bm.free(b)
    check(bm, [])
    assert bm.num_free_blocks == 8


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = seq([1, 2, 3])
    bm.allocate(a, 3)
    compute(bm, a, 3)
    assert bm.find_cached_prefix(seq([1, 2, 3])) == []
    assert bm.hash_to_block == {}


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(8, 2)
    a, b = seq([1, 2, 3]), seq([4, 5, 6])
    for s in (a, b):
        bm.allocate(s, 3)
        compute(bm, s, 3)
    bm.free(a)
    assert bm.reset_prefix_cache() == 1
    assert bm.find_cached_prefix(seq([1, 2, 3])) == []
    assert bm.find_cached_prefix(seq([4, 5, 6])) == b.block_table[:1]
    check(bm, [b])


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
