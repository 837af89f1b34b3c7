"""The scheduling policy: which sequences compute how many tokens in the next step.

Continuous batching: sequences join and leave at every step. Each step has a budget
(`max_num_batched_tokens`) and a cap on running sequences (`max_num_seqs`). A step is filled in
this order (docs/scheduling.md gives the policy, its reasons and its bounds):

0. Room for a newcomer: when the first waiting request that holds no running sequence finds no
   slot (or no blocks for its first chunk), the request holding the most running sequences gives
   up its newest one (preempted, recomputed later), as long as it keeps at least one. So a large
   `n` cannot keep everyone else out.
1. Decodes: every running sequence with one token left to compute, one budget unit each.
2. First chunks of waiting sequences, round-robin over requests: the request holding the fewest
   running sequences goes first (ties: the earlier arrival). Only the step's first admission may
   start a prompt in chunks; a later prompt that does not fit whole waits for the next step.
3. Later chunks of prompts part-way through a chunked prefill, in admission order.

So a new request's first chunk never waits behind the rest of someone else's long prompt. A
prefill chunk costs one unit per token plus its attention: a token attending over `c` positions
costs `1 + c / context_cost_tokens` units (`context_cost_tokens`: the context length at which
attention costs as much as the rest of the model's work for a token). Late chunks of a long prompt
are therefore smaller, and a step takes about the same time at any context length.

On a GPU, waiting sequences are admitted in groups (`admit_group`, `admit_max_wait`: step 2 runs
when admission is due), and `schedule_ahead` launches decode steps ahead meanwhile (none while a
newcomer needs the room of step 0).

When blocks run out for a running sequence, the newest running sequence is preempted: its blocks go
back to the pool and it waits at the head of the queue to be recomputed (prompt and output so far).

Whatever ends a sequence (`finish`, `abort`, a stop found in `postprocess`), its blocks go back.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections import Counter, deque
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
        context_cost_tokens: int | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be >= 1")
        if context_cost_tokens is not None and context_cost_tokens < 1:
            raise ValueError(f"context_cost_tokens must be >= 1 or None, got {context_cost_tokens}")
        if not chunked_prefill and context_cost_tokens is not None:
            raise ValueError("context_cost_tokens needs chunked prefill")
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
        self.context_cost_tokens = context_cost_tokens
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
        self._make_room_for_a_newcomer(batch)
        made_room = len(batch.preempted)
        budget = float(self.max_num_batched_tokens)
        scheduled: set[int] = set()
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        partial = [s for s in self.running if s.num_uncomputed_tokens > 1]
        budget = self._schedule_running(batch, decodes, budget, scheduled)
        admit = self._admission_due()
        room = self.waiting and len(self.running) < self.max_num_seqs
        self._held_steps = self._held_steps + 1 if room and not admit else 0
        if admit and len(batch.preempted) == made_room:  # nobody new while blocks run short
            budget = self._admit_waiting(batch, budget, scheduled)
        self._schedule_running(batch, partial, budget, scheduled)
        return batch

    def schedule_ahead(self, inflight: ScheduledBatch) -> ScheduledBatch | None:
        """The next decode step of `inflight`'s sequences, scheduled while `inflight` (a step of
        one sampled token per row) still runs, as if each had its token: row `i` computes that
        token at position `starts[i]`, reading it where the runner left it on the device (and
        its penalty counts there too).

        Sequences that end by length with this token are left out. None when the next step has
        to be scheduled from the results instead: a waiting sequence is to be admitted (or a
        newcomer needs a slot made), or blocks run short (preemption is decided then).
        """
        if self._admission_due() or self._newcomer_without_room() is not None:
            return None
        if self.waiting and len(self.running) < self.max_num_seqs:
            self._held_steps += 1  # held back this step too (the bound counts every step)
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

    def _newcomer_without_room(self) -> Sequence | None:
        """The first waiting sequence of a request holding no running sequence, if it finds no
        slot (or too few free blocks for a first chunk) while some request holds two or more:
        the one step 0 makes room for. None otherwise."""
        if not self.waiting:
            return None
        held = Counter(s.request_id for s in self.running)
        if max(held.values(), default=0) < 2:
            return None
        newcomer = next((s for s in self.waiting if not held[s.request_id]), None)
        if newcomer is None:
            return None
        bm = self.block_manager
        blocks = bm.blocks_for(min(newcomer.num_tokens, self.max_num_batched_tokens))
        if len(self.running) < self.max_num_seqs and blocks <= bm.num_free_blocks:
            return None
        return newcomer

    def _make_room_for_a_newcomer(self, batch: ScheduledBatch) -> None:
        """Step 0: the newcomer without room gets a slot, and blocks for a first chunk, from the
        request holding the most running sequences (its newest), while that one keeps at least
        one."""
        newcomer = self._newcomer_without_room()
        if newcomer is None:
            return
        held = Counter(s.request_id for s in self.running)
        bm = self.block_manager
        blocks = bm.blocks_for(min(newcomer.num_tokens, self.max_num_batched_tokens))
        while True:
            no_slot = len(self.running) >= self.max_num_seqs
            if not no_slot and blocks <= bm.num_free_blocks:
                return
            rid, count = max(held.items(), key=lambda kv: kv[1])
            if count < 2:
                return
            victim = next(s for s in reversed(self.running) if s.request_id == rid)
            free_before = bm.num_free_blocks
            self._preempt(victim)
            batch.preempted.append(victim)
            held[rid] -= 1
            if not no_slot and bm.num_free_blocks == free_before:
                return  # its blocks are shared with its siblings: preempting more frees nothing

    def _schedule_running(
        self, batch: ScheduledBatch, seqs: list[Sequence], budget: float, scheduled: set[int]
    ) -> float:
        """Steps 1 and 3: the next token or chunk of each running sequence of `seqs`, preempting
        the newest running sequence not yet scheduled while blocks run short. Returns the budget
        left."""
        bm = self.block_manager
        for seq in seqs:
            if budget < 1:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            start, remaining = seq.num_computed_tokens, seq.num_uncomputed_tokens
            n = 1 if remaining == 1 else self._chunk(start, remaining, budget, batch)
            if n == 0:
                continue
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
            budget -= 1 if remaining == 1 else self._chunk_cost(start, n)
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: float, scheduled: set[int]) -> float:
        """Step 2: first chunks of waiting sequences, round-robin over requests: the request
        holding the fewest running sequences first, ties to the earlier in the queue. Only the
        step's first admission may start a prompt in chunks; a later one whose prompt does not
        fit whole waits for a step with room (it would otherwise wait behind older prompts' later
        chunks), and the next in turn goes on. Stops at the first that finds no blocks. Returns
        the budget left."""
        if not self.waiting or budget < 1 or len(self.running) >= self.max_num_seqs:
            return budget
        bm = self.block_manager
        held = Counter(s.request_id for s in self.running)
        queues: dict[str, deque[Sequence]] = {}
        for seq in self.waiting:
            queues.setdefault(seq.request_id, deque()).append(seq)
        turns = [(held[rid], order, rid) for order, rid in enumerate(queues)]
        heapq.heapify(turns)
        admitted = False
        while turns and budget >= 1 and len(self.running) < self.max_num_seqs:
            count, order, rid = heapq.heappop(turns)
            seq = queues[rid].popleft()
            cached = [] if seq.params.prompt_logprobs is not None else bm.find_cached_prefix(seq)
            start = len(cached) * bm.block_size
            remaining = seq.num_tokens - start
            n = self._chunk(start, remaining, budget, batch)
            if n < remaining and (admitted or not self.chunked_prefill):
                if not self.chunked_prefill:
                    break
                continue  # its request sits this step out
            if n == 0 or not bm.can_allocate(seq, n, cached):
                break
            bm.allocate(seq, n, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            scheduled.add(seq.seq_id)
            budget -= self._chunk_cost(start, n)
            admitted = True
            if queues[rid]:
                heapq.heappush(turns, (count + 1, order, rid))
        if admitted:
            self.waiting = deque(s for s in self.waiting if s.status is SequenceStatus.WAITING)
        return budget

    def _chunk_cost(self, start: int, n: int) -> float:
        """Budget units for prompt positions `start` .. `start + n - 1`: one per token, plus
        attention (position p attends over p + 1 positions; `context_cost_tokens` of them cost
        one unit)."""
        k = self.context_cost_tokens
        return n if k is None else n + n * (start + (n + 1) / 2) / k

    def _chunk(self, start: int, remaining: int, budget: float, batch: ScheduledBatch) -> int:
        """The longest chunk of the `remaining` tokens from `start` whose cost fits `budget`; at
        least one token while the batch is empty, so that every step makes progress."""
        k = self.context_cost_tokens
        if k is None:
            n = min(remaining, int(budget))
        elif self._chunk_cost(start, remaining) <= budget:
            n = remaining
        else:  # the root of n^2 / 2k + n (1 + (start + 1/2) / k) = budget, rounded down
            b = 1 + (start + 0.5) / k
            n = min(int(k * (math.sqrt(b * b + 2 * budget / k) - b)), remaining)
            while n > 0 and self._chunk_cost(start, n) > budget:
                n -= 1
        return max(n, 1) if batch.is_empty else n

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
