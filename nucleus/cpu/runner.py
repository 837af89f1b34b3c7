"""`CpuRunner`: the engine's model runner for a `CpuModel`, without torch on the common path.

It owns the KV cache (float16, as llama.cpp keeps it, in lazily mapped zero pages,
`kv_budget.lazy_zeros`: resident memory grows with the tokens held), lays each scheduled batch out for the C forward pass and picks the tokens.
A step whose sampled rows are all plain greedy (temperature 0, no penalties, biases, bans,
logprobs or constraints) is finished here: logits, argmax, the non-finite check. Any other step
goes to `nucleus.cpu.torch_runner.CpuModelRunner`, the engine's `ModelRunner` sampling over the
same model and cache, built (and torch imported) the first time one comes. So `nucleus generate`
with the default greedy settings never imports torch, and every other request gets exactly the
sampler the other devices use.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from nucleus.cpu.model import Batch, CpuModel
from nucleus.engine import kv_budget
from nucleus.engine.scheduler import ScheduledBatch, StepResult
from nucleus.engine.sequence import Sequence
from nucleus.sampling_params import SamplingParams

NONFINITE_ERROR = "the model's logits for this sequence are not finite (NaN/inf)"


def bytes_per_block(model: CpuModel, block_size: int) -> int:
    """Float16 keys and values of every layer for one block."""
    c = model.config
    return 2 * c.n_layers * block_size * c.n_kv_heads * c.head_dim * 2


def auto_num_blocks(
    model: CpuModel,
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    memory_fraction: float | None = None,
) -> int:
    """`nucleus.engine.kv_budget.num_kv_blocks` for the CPU cache of `model`."""
    return kv_budget.num_kv_blocks(
        bytes_per_block=bytes_per_block(model, block_size),
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        free_bytes=kv_budget.available_ram_bytes(),
        fraction=memory_fraction or kv_budget.CPU_FRACTION,
        cap_bytes=kv_budget.CPU_CAP_BYTES,
    )


def is_plain_greedy(params: SamplingParams) -> bool:
    """Whether a request's tokens are the argmax of the raw logits (while it is past min_tokens)
    with nothing else asked: what `CpuRunner` serves without the full sampler."""
    return (
        params.temperature == 0
        and params.logprobs is None
        and params.prompt_logprobs is None
        and params.repetition_penalty == 1
        and not params.frequency_penalty
        and not params.presence_penalty
        and not params.logit_bias
    )


class CpuRunner:
    """Runs scheduled batches on a `CpuModel` (the engine's `ModelRunner` for the CPU path).

    Args:
        model: the model.
        num_kv_blocks, block_size: the KV cache's geometry.
        stop_token_ids: the model's stop tokens (banned while a sequence is under `min_tokens`).
    """

    def __init__(
        self,
        model: CpuModel,
        *,
        num_kv_blocks: int,
        block_size: int = 16,
        stop_token_ids: frozenset[int] | set[int] = frozenset(),
    ) -> None:
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.stop_token_ids = frozenset(stop_token_ids)
        c = model.config
        shape = (c.n_layers, num_kv_blocks, block_size, c.n_kv_heads, c.head_dim)
        nbytes = 2 * math.prod(shape)
        self.k_cache = kv_budget.lazy_zeros(nbytes).view(np.float16).reshape(shape)
        self.v_cache = kv_budget.lazy_zeros(nbytes).view(np.float16).reshape(shape)
        self._batch = Batch(
            k_cache=self.k_cache.ctypes.data,
            v_cache=self.v_cache.ctypes.data,
            num_blocks=num_kv_blocks,
            block_size=block_size,
        )
        self._full_runner: Any = None

    @property
    def num_kv_blocks(self) -> int:
        return self.k_cache.shape[1]

    def forward(self, seqs: list[Sequence], starts: list[int], num_tokens: list[int]) -> np.ndarray:
        """Final normed hidden states `(T, dim)` of tokens `token_ids[start : start + n]` of each
        sequence, in order, their K/V written through each sequence's block table."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq, start, n in zip(seqs, starts, num_tokens, strict=True):
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        contexts = [start + n for start, n in zip(starts, num_tokens, strict=True)]
        first_rows = [0, *itertools.accumulate(num_tokens[:-1])]
        # One array for all of them (one conversion, one address): the step's host work at
        # batch 1 is a few tens of microseconds.
        t, s = len(ids), len(seqs)
        layout = np.array(
            ids + positions + slots + first_rows + num_tokens + contexts, dtype=np.int64
        )
        width = max(len(seq.block_table) for seq in seqs)
        tables = np.array(
            [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs], dtype=np.int64
        )
        base, b = layout.ctypes.data, self._batch
        b.tokens, b.positions, b.slots = base, base + 8 * t, base + 16 * t
        b.seq_start, b.seq_len, b.seq_context = (
            base + 24 * t,
            base + 24 * t + 8 * s,
            base + 24 * t + 16 * s,
        )
        b.block_tables = tables.ctypes.data
        b.num_tokens, b.num_seqs, b.table_width = t, s, width
        hidden = np.empty((t, self.config.dim), dtype=np.float32)
        return self.model.forward(b, hidden)

    def execute(self, batch: ScheduledBatch, *args: Any) -> StepResult:
        """Run one step. Extra arguments (those of `ModelRunner.execute`) mean a step for the full
        sampler, as does any sampled row that is not plain greedy."""
        rows = [i for i, need in enumerate(batch.needs_sample) if need]
        if args or not self._plain(batch, rows):
            return self._full().execute(batch, *args)
        result = StepResult([None] * len(batch), [None] * len(batch), [None] * len(batch))
        hidden = self.forward(batch.seqs, batch.starts, batch.num_tokens)
        if not rows:
            return result
        ends = list(itertools.accumulate(batch.num_tokens))
        logits = self.model.logits(hidden[[ends[i] - 1 for i in rows]])
        tokens = logits.argmax(axis=-1).tolist()
        finite = np.isfinite(logits.sum(axis=-1)).tolist()
        for j, i in enumerate(rows):
            if finite[j]:
                result.token_ids[i] = tokens[j]
            else:
                result.errors[i] = NONFINITE_ERROR
        return result

    def _plain(self, batch: ScheduledBatch, rows: list[int]) -> bool:
        if any(s.params.prompt_logprobs is not None for s in batch.seqs):
            return False
        for i in rows:
            seq = batch.seqs[i]
            if not is_plain_greedy(seq.params) or seq.num_output_tokens < seq.params.min_tokens:
                return False
        return True

    def _full(self) -> Any:
        if self._full_runner is None:
            from nucleus.cpu.torch_runner import CpuModelRunner

            self._full_runner = CpuModelRunner(self)
        return self._full_runner
