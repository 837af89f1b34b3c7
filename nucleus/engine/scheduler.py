"""The scheduling policy: which sequences compute how many tokens in the next step.

Continuous batching: sequences join and leave at every step. Each step has a token budget
(`max_num_batched_tokens`) and a cap on running sequences (`max_num_seqs`). Running sequences go
first (decodes, then prompts part-way through a chunked prefill), then waiting ones in arrival
order (first come, first served: a waiting sequence that does not fit blocks those behind it).
A prompt longer than the budget left is computed in chunks over several steps.

When blocks run out, the newest running sequence is preempted: its blocks go back to the pool and it
waits at the head of the queue to be recomputed (prompt and output so far) later.

Whatever ends a sequence (`finish`, `abort`, a stop found in `postprocess`), its blocks go back.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nucleus.engine.block_manager import BlockManager
from nucleus.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work, in the order the runner lays the flat batch out.

    For `seqs[i]` the runner computes tokens `token_ids[starts[i] : starts[i] + num_tokens[i]]`
    (their K/V written at those positions through `seqs[i].block_table`; attention over the first
    `starts[i] + num_tokens[i]` tokens), and samples a token only where `needs_sample[i]` (the chunk
    reaches the end of the sequence's tokens). These lists are fixed when scheduled; `postprocess`
    then advances each `num_computed_tokens`.
    """

    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    needs_sample: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # preempted while scheduling

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sample_indices(self) -> list[int]:
        """The rows that sample a token this step, in order (the sampler's rows)."""
        return [i for i, need in enumerate(self.needs_sample) if need]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.starts.append(seq.num_computed_tokens)
        self.num_tokens.append(num_tokens)
        self.needs_sample.append(seq.num_computed_tokens + num_tokens == seq.num_tokens)


@dataclass
class StepResult:
    """Per row of the batch: the sampled token (None where nothing was sampled), its raw logprob
    and top-N alternatives (None unless asked), and an error message for a failed row."""

    token_ids: list[int | None]
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int = 8192,
        stop_token_ids: Iterable[int] = (),
        chunked_prefill: bool = True,
        admit_group: int = 1,
        admit_max_wait: int = 0,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be >= 1")
        if not chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({max_num_batched_tokens} < {max_model_len})"
            )
        if block_manager.num_blocks * block_manager.block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {block_manager.num_blocks} blocks of {block_manager.block_size}"
                f" tokens, fewer than one sequence of max_model_len={max_model_len} needs"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.stop_token_ids = frozenset(stop_token_ids)  # the model's own (eos, eot)
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        # Admission in groups (docs/scheduling.md): while sequences run, waiting ones are admitted
        # once `admit_group` slots are free (or every waiting one fits), or once admission has
        # been held back for `admit_max_wait` steps. 1 and 0: whenever there is room.
        self.admit_group = max(admit_group, 1)
        self.admit_max_wait = admit_max_wait
        self._held_steps = 0  # consecutive steps admission was held back

    # ---- queue --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {seq.num_tokens} tokens; the model's context is "
                f"{self.max_model_len} tokens and one is needed for the output"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- the policy ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences: decodes first, then chunked prefills part-way through.
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        partial = [s for s in self.running if s.num_uncomputed_tokens > 1]
        scheduled: set[int] = set()
        for seq in decodes + partial:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below, earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_append_slots(seq, n):
                victim = self._pick_victim(scheduled)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.append_slots(seq, n)
            batch.add(seq, n)
            scheduled.add(seq.seq_id)
            budget -= n

        # 2. Waiting sequences, first come first served; none while preempting.
        admit = self._admission_due()
        room = self.waiting and len(self.running) < self.max_num_seqs
        self._held_steps = self._held_steps + 1 if room and not admit else 0
        while admit and self.waiting and budget > 0 and not batch.preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            cached = [] if seq.params.prompt_logprobs is not None else bm.find_cached_prefix(seq)
            remaining = seq.num_tokens - len(cached) * bm.block_size
            if not self.chunked_prefill and remaining > budget:
                break
            n = min(remaining, budget)
            if not bm.can_allocate(seq, n, cached):
                break
            self.waiting.popleft()
            bm.allocate(seq, n, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def schedule_ahead(self, inflight: ScheduledBatch) -> ScheduledBatch | None:
        """The next decode step of `inflight`'s sequences, scheduled while `inflight` (a step of
        one sampled token per row) still runs, as if each had its token: row `i` computes that
        token at position `starts[i]`, reading it where the runner left it on the device (and
        its penalty counts there too).

        Sequences that end by length with this token are left out. None when the next step has
        to be scheduled from the results instead: a waiting sequence is to be admitted, or blocks
        run short (preemption is decided then).
        """
        if self._admission_due():
            return None
        bm = self.block_manager
        rows: list[Sequence] = []
        for seq in inflight.seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # ended since it was scheduled (stop, abort, error)
            p = seq.params
            after = seq.num_output_tokens + 1  # outputs once the token in flight is in
            if (p.max_tokens is not None and after >= p.max_tokens) or (
                seq.num_tokens + 1 >= self.max_model_len
            ):
                continue  # the token in flight is its last
            rows.append(seq)
        if not rows or len(rows) > self.max_num_batched_tokens:
            return None
        # Room for the token in flight and this one (the runner writes both K/Vs).
        if sum(bm.num_new_blocks(seq, 2) for seq in rows) > bm.num_free_blocks:
            return None
        batch = ScheduledBatch()
        for seq in rows:
            bm.append_slots(seq, 2)
            batch.seqs.append(seq)
            batch.starts.append(seq.num_computed_tokens + 1)
            batch.num_tokens.append(1)
            batch.needs_sample.append(True)
        return batch

    def _admission_due(self) -> bool:
        """Whether the next step admits waiting sequences (when the pool lets it)."""
        free = self.max_num_seqs - len(self.running)
        if not self.waiting or free <= 0:
            return False
        return (
            not self.running
            or free >= min(self.admit_group, len(self.waiting))
            or self._held_steps >= self.admit_max_wait
        )

    def _pick_victim(self, scheduled: set[int]) -> Sequence:
        """The newest running sequence not yet scheduled in this step (the caller itself at worst:
        it is running and unscheduled)."""
        for seq in reversed(self.running):
            if seq.seq_id not in scheduled:
                return seq
        raise RuntimeError("no sequence to preempt")  # unreachable: the caller is a candidate

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # newest preempted first, so arrival order is kept

    # ---- after the step -----------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance every scheduled sequence by its chunk and append its sampled token.

        `sampled[i]` is the token for `batch.seqs[i]` (None where `needs_sample` was False). Stop
        tokens and length limits end sequences here; stop strings are the engine's (it calls
        `finish`). Sequences finished before this call (an error, an abort) are skipped. Returns
        the sequences that received a token, finished or not.
        """
        bm = self.block_manager
        got_token = []
        for seq, start, n, token in zip(
            batch.seqs, batch.starts, batch.num_tokens, sampled, strict=True
        ):
            if seq.status is not SequenceStatus.RUNNING or start != seq.num_computed_tokens:
                continue  # ended, or preempted and recomputed since this step was scheduled
            before = seq.num_computed_tokens
            seq.num_computed_tokens = before + n
            bm.cache_blocks(seq, before)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a chunk of a prefill: nothing sampled
            if token is None:
                raise ValueError(f"{seq} reached the end of its tokens but no token was sampled")
            seq.append_token(token)
            got_token.append(seq)
            self._check_stop(seq, token)
        return got_token

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        is_stop = (not p.ignore_eos and token in self.stop_token_ids) or (
            p.stop_token_ids is not None and token in p.stop_token_ids
        )
        if is_stop and seq.num_output_tokens >= p.min_tokens:
            seq.stop_reason = token
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            return
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        ):
            self.finish(seq, SequenceStatus.FINISHED_LENGTH)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End `seq` with a finished status, wherever it is; its blocks go back to the pool."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = status

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in list(seqs):
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Abort every unfinished sequence of a request; returns them."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        self.abort(seqs)
        return seqs
