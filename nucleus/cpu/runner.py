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
from dataclasses import dataclass
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


@dataclass
class DoneStep:
    """A step the CPU path has already computed (`ModelRunner.launch`'s `StepHandle`)."""

    rows: list[int]  # the batch rows that sampled
    done: StepResult

    def result(self) -> StepResult:
        return self.done


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
        self.device = "cpu"
        self.workers = None  # no tensor parallelism on this path
        self.can_feed_tokens_on_device = False  # each step's tokens come back before the next

    @property
    def num_kv_blocks(self) -> int:
        return self.k_cache.shape[1]

    def forward(self, seqs: list[Sequence], starts: list[int], num_tokens: list[int]) -> np.ndarray:
        """Final normed hidden states `(T, dim)` of tokens `token_ids[start : start + n]` of each
        sequence, in order, their K/V written through each sequence's block table."""
        ids = [
            t
            for s, a, n in zip(seqs, starts, num_tokens, strict=True)
            for t in s.token_ids[a : a + n]
        ]
        return self.hidden(ids, starts, num_tokens, [s.block_table for s in seqs])

    def hidden(
        self,
        token_ids: list[int],
        starts: list[int],
        num_tokens: list[int],
        block_tables: list[list[int]],
    ) -> np.ndarray:
        """`forward` for a flat batch: row `i` computes `num_tokens[i]` of `token_ids` from
        position `starts[i]` through `block_tables[i]`."""
        bs = self.block_size
        positions: list[int] = []
        slots: list[int] = []
        for start, n, table in zip(starts, num_tokens, block_tables, strict=True):
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        contexts = [start + n for start, n in zip(starts, num_tokens, strict=True)]
        first_rows = [0, *itertools.accumulate(num_tokens[:-1])]
        # One array for all of them (one conversion, one address): the step's host work at
        # batch 1 is a few tens of microseconds.
        t, s = len(token_ids), len(starts)
        layout = np.array(
            token_ids + positions + slots + first_rows + list(num_tokens) + contexts,
            dtype=np.int64,
        )
        width = max(len(table) for table in block_tables)
        tables = np.array(
            [list(table) + [0] * (width - len(table)) for table in block_tables], dtype=np.int64
        )
        base, b = layout.ctypes.data, self._batch
        b.tokens, b.positions, b.slots = base, base + 8 * t, base + 16 * t
        b.seq_start, b.seq_len = base + 24 * t, base + 24 * t + 8 * s
        b.seq_context = base + 24 * t + 16 * s
        b.block_tables = tables.ctypes.data
        b.num_tokens, b.num_seqs, b.table_width = t, s, width
        hidden = np.empty((t, self.config.dim), dtype=np.float32)
        return self.model.forward(b, hidden)

    def launch(self, batch: ScheduledBatch, after: Any = None, masks: Any = None) -> Any:
        """Run one step (`ModelRunner.launch`'s interface; the CPU computes it at once): a
        greedy step here, any other, or one with structured-output `masks`, by the full
        sampler. `after` is never given: `can_feed_tokens_on_device` is False."""
        rows = batch.sample_indices
        if masks is not None or not self._plain(batch, rows):
            return self._full().launch(batch, masks=masks)
        result = StepResult([None] * len(batch), [None] * len(batch), [None] * len(batch))
        hidden = self.forward(batch.seqs, batch.starts, batch.num_tokens)
        if rows:
            ends = list(itertools.accumulate(batch.num_tokens))
            logits = self.model.logits(hidden[[ends[i] - 1 for i in rows]])
            tokens = logits.argmax(axis=-1).tolist()
            finite = np.isfinite(logits.sum(axis=-1)).tolist()
            for j, i in enumerate(rows):
                if finite[j]:
                    result.token_ids[i] = tokens[j]
                else:
                    result.errors[i] = NONFINITE_ERROR
        return DoneStep(rows, result)

    def execute(self, batch: ScheduledBatch, masks: Any = None) -> StepResult:
        """Run one step and return its results."""
        return self.launch(batch, masks=masks).result()

    def release(self, seq: Sequence) -> None:
        """A sequence ended: drop what the full sampler kept for it (its penalty counts)."""
        if self._full_runner is not None:
            self._full_runner.release(seq)

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
