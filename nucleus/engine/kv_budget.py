"""How many KV cache blocks to allocate, from what the requests can use and the memory there is.

The cache never needs more than `max_num_seqs` sequences of `max_model_len` tokens each: that is
its size unless memory is shorter (CUDA: a fraction of what is free after the weights; CPU: of the
available RAM, capped). On the CPU the cache is allocated as untouched zero pages (`lazy_zeros`),
so its resident memory grows with the tokens it holds, not with its size. docs/cpu.md says this
for users.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

GiB = 1 << 30

# Share of free memory the cache may take by default, and the CPU's cap.
CUDA_FRACTION = 0.9
CPU_FRACTION = 0.3
CPU_CAP_BYTES = 8 * GiB


def available_ram_bytes() -> int:
    """Available RAM (free and reclaimable), or a modest guess where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 * GiB


def num_kv_blocks(
    *,
    bytes_per_block: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    free_bytes: int,
    fraction: float,
    cap_bytes: int | None = None,
    where: str = "cpu",
) -> int:
    """Blocks for `max_num_seqs` sequences of `max_model_len` tokens, within `fraction` of
    `free_bytes` (and `cap_bytes`); never fewer than one full-length sequence needs.

    Raises:
        MemoryError: not even one sequence of `max_model_len` tokens fits.
    """
    budget = int(free_bytes * fraction)
    if cap_bytes is not None:
        budget = min(budget, cap_bytes)
    one_seq = -(-max_model_len // block_size)
    num = min(budget // bytes_per_block, one_seq * max_num_seqs)
    if num < one_seq:
        raise MemoryError(
            f"the KV cache for one sequence of {max_model_len} tokens needs "
            f"{one_seq * bytes_per_block / GiB:.2f} GiB; only {budget / GiB:.2f} GiB can be used "
            f"on {where}: lower max_model_len or set num_kv_blocks"
        )
    return num


def lazy_zeros(nbytes: int) -> np.ndarray:
    """`nbytes` of zeros (uint8) that take memory only where they are written: an anonymous
    mapping, in small pages. A cache touched at scattered places would otherwise get a 2 MB huge
    page for each (transparent huge pages), hundreds of MB for a few tokens."""
    mapping = mmap.mmap(-1, max(nbytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype=np.uint8)[:nbytes]
