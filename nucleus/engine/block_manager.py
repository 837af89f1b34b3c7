"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, reference counts, prefix caching.

Plain ints and lists only; the runner owns the tensors. A block is in exactly one of three places:
held (reference count > 0), free and empty, or free but still cached (its content is known by
hash and can be revived by a prefix hit until it is evicted, least recently freed first).

Prefix caching: every full, computed block gets a hash chained over its tokens and the hash of the
block before it, so equal hashes mean equal prefixes; a hit is also checked against the block's own
tokens. Only full blocks are shared, and a shared block is never written again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from nucleus.engine.sequence import Sequence


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """The chained hash of one full block: of the previous block's hash and of these tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self._free_empty: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest first: evicted first
        # Metrics: prefix-cache queries and hits, in blocks.
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    # ---- pool state -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_empty) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences (cached-but-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """The chained hashes of the first `num_full_blocks` blocks (cached on the sequence)."""
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(
                hash_block(hashes[-1] if i else None, seq.token_ids[i * size : (i + 1) * size])
            )
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (no reference taken).

        At least one token is always left to compute, so that the step that admits the sequence
        produces its logits.
        """
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        max_blocks = (seq.num_tokens - 1) // size
        hits: list[int] = []
        for i, h in enumerate(self._block_hashes(seq, max_blocks)):
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tuple(
                seq.token_ids[i * size : (i + 1) * size]
            ):
                break
            hits.append(block)
        self.num_queried_blocks += max_blocks
        return hits

    def _take_free_block(self) -> int:
        if self._free_empty:
            block = self._free_empty.popleft()
        elif self._free_cached:
            block, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            h = self.block_hash[block]
            if h is not None and self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_tokens[block] = None
        else:
            raise RuntimeError("the KV block pool is exhausted (scheduler bug: check first)")
        self.ref_counts[block] = 1
        return block

    # ---- allocation -------------------------------------------------------------------------
    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()
    ) -> bool:
        """Whether a sequence holding no blocks can take `cached_blocks` plus room for
        `num_new_tokens` tokens after them."""
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_new_blocks = self.blocks_for(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return num_new_blocks + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> None:
        """Give a sequence that holds no blocks its prefix-cache hits and room for
        `num_new_tokens` more tokens; sets `num_computed_tokens` to the tokens found cached."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            raise RuntimeError(f"not enough free KV blocks for {seq}")
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self._free_cached[block]
            self.ref_counts[block] += 1
        seq.block_table = list(cached_blocks)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached_blocks) * self.block_size
        self.num_hit_blocks += len(cached_blocks)
        self.append_slots(seq, num_new_tokens)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(needed, 0)

    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to hold `num_computed_tokens + num_new_tokens` tokens."""
        needed = self.num_new_blocks(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"not enough free KV blocks for {seq}")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def cache_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register, for prefix hits, the blocks of `seq` that became full and computed since
        `num_computed_before` (call after `seq.num_computed_tokens` was advanced)."""
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.block_size
        end = seq.num_computed_tokens // self.block_size
        if end <= first:
            return
        hashes = self._block_hashes(seq, end)
        size = self.block_size
        for i in range(first, end):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue  # a prefix hit: already registered
            h = hashes[i]
            if h in self.hash_to_block:
                continue  # the same content computed twice at once: keep the first copy
            self.block_hash[block] = h
            self.block_tokens[block] = tuple(seq.token_ids[i * size : (i + 1) * size])
            self.hash_to_block[h] = block

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` (last first, so a prefix's tail is evicted before its head);
        resets `num_computed_tokens`. Idempotent: a sequence holding nothing frees nothing."""
        for block in reversed(seq.block_table):
            count = self.ref_counts[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self.ref_counts[block] = count
            if count == 0:
                if self.block_hash[block] is not None:
                    self._free_cached[block] = None
                else:
                    self._free_empty.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> int:
        """Forget every free cached block; returns how many were forgotten."""
        n = len(self._free_cached)
        for block in self._free_cached:
            h = self.block_hash[block]
            if h is not None and self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_tokens[block] = None
            self._free_empty.append(block)
        self._free_cached.clear()
        return n
