"""The scheduling policy, driven without a model: sampled tokens are made up.

The state machine at the end drives random interleavings of add, step, abort, finish and errors
against a tiny pool, and checks after every move that nothing leaks, nothing is freed twice, no
reference count is negative, every finished sequence holds no block, and every computed position
of every live sequence reads K/V written for exactly its own prefix (so a prefix hit happens only
for identical content, and no shared block is overwritten).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nucleus.engine.block_manager import BlockManager
from nucleus.engine.scheduler import ScheduledBatch, Scheduler
from nucleus.engine.sequence import Sequence, SequenceStatus
from nucleus.sampling_params import SamplingParams

EOS = 0


def make(num_blocks=16, block_size=4, **kw) -> Scheduler:
    kw.setdefault("max_model_len", 32)
    kw.setdefault("stop_token_ids", [EOS])
    return Scheduler(BlockManager(num_blocks, block_size), **kw)


def seq(tokens, rid="r", **params) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(**params))


def step(s: Scheduler, token: int = 7) -> ScheduledBatch:
    batch = s.schedule()
    s.postprocess(batch, [token if need else None for need in batch.needs_sample])
    return batch


def test_prefill_then_decode_then_length_finish_frees_blocks():
    s = make()
    a = seq([1, 2, 3, 4, 5], max_tokens=3)
    s.add(a)
    b = step(s)
    assert b.seqs == [a] and b.num_tokens == [5] and b.needs_sample == [True]
    assert a.output_token_ids == [7] and a.num_computed_tokens == 5
    assert step(s).num_tokens == [1]
    step(s)
    assert a.status is SequenceStatus.FINISHED_LENGTH and a.output_token_ids == [7, 7, 7]
    assert a.block_table == [] and s.block_manager.num_free_blocks == 16
    assert not s.has_unfinished()


def test_admission_in_groups_waits_for_free_slots_or_a_bounded_number_of_steps():
    """GPU policy: while sequences decode, waiting ones are admitted together once `admit_group`
    slots are free (or all of them fit), or after `admit_max_wait` steps held back."""
    s = make(num_blocks=64, max_num_seqs=4, admit_group=2, admit_max_wait=3)
    first = [seq([1, 2], rid=f"a{i}", max_tokens=20 if i else 2) for i in range(4)]
    for q in first:
        s.add(q)
    step(s)  # all four admitted: nothing was running
    assert len(s.running) == 4
    late = [seq([3, 4], rid=f"b{i}") for i in range(3)]
    for q in late:
        s.add(q)
    step(s)  # a0 ends: one slot free, fewer than the group of 2 and than the 3 waiting
    assert first[0].is_finished and len(s.waiting) == 3
    held = [step(s) for _ in range(3)]  # held back 3 steps: decodes only
    assert all(late[0] not in b.seqs for b in held)
    assert late[0] in step(s).seqs  # the wait bound reached: admitted where there is room
    assert len(s.waiting) == 2


def test_decodes_go_first_and_a_long_prompt_is_chunked_within_the_budget():
    s = make(num_blocks=32, max_num_batched_tokens=8, max_model_len=64)
    a = seq([1, 2, 3])
    s.add(a)
    step(s)  # a prefilled, now decoding
    long = seq(range(1, 21))
    s.add(long)
    b = step(s)
    assert b.seqs == [a, long] and b.num_tokens == [1, 7] and b.needs_sample == [True, False]
    b = step(s)
    assert b.seqs[0] is a and b.num_tokens == [1, 7]
    b = step(s)
    assert b.num_tokens == [1, 6] and b.needs_sample == [True, True]
    assert long.num_computed_tokens == 20 and long.output_token_ids == [7]


def test_first_come_first_served_a_big_head_blocks_the_queue():
    s = make(num_blocks=4, block_size=4, max_model_len=16, max_num_batched_tokens=64)
    a = seq(range(1, 10))  # 3 blocks
    s.add(a)
    step(s)
    big, small = seq(range(11, 18), "big"), seq([1], "small")
    s.add(big)
    s.add(small)
    b = step(s)
    assert b.seqs == [a]  # big needs 2 blocks, 1 is free; small waits behind it
    assert list(s.waiting) == [big, small]


def test_max_num_seqs_caps_the_running_set():
    s = make(max_num_seqs=2)
    seqs = [seq([i + 1]) for i in range(3)]
    for x in seqs:
        s.add(x)
    assert step(s).seqs == seqs[:2]
    assert s.waiting[0] is seqs[2]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    s = make(num_blocks=3, block_size=2, max_model_len=6)
    a, b = seq([1, 2, 3], "a"), seq([4, 5], "b")
    s.add(a)
    s.add(b)
    step(s)  # a: 2 blocks, b: 1 block; pool full
    assert s.block_manager.num_free_blocks == 0
    batch = step(s)  # a fits in its block; b (2 tokens + 1) needs a new block: preempt b itself
    assert batch.seqs == [a] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and b.output_token_ids == [7]
    while a.status is SequenceStatus.RUNNING:
        step(s)
    batch = s.schedule()  # b is recomputed: prompt and its output so far
    assert batch.seqs == [b] and batch.num_tokens == [3]


def test_preemption_picks_the_newest_running_sequence():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    a, b = seq([1, 2, 3], "a"), seq([4, 5, 6], "b")
    s.add(a)
    s.add(b)
    step(s)  # 2 blocks each
    step(s)  # both at 4 tokens: their last blocks are now full
    batch = step(s)  # a needs a block: b (newest) goes
    assert batch.preempted == [b] and batch.seqs == [a]


@pytest.mark.parametrize(
    ("params", "tokens", "status", "n_out"),
    [
        ({}, [5, EOS], SequenceStatus.FINISHED_STOPPED, 2),
        ({"ignore_eos": True, "max_tokens": 3}, [5, EOS, 6], SequenceStatus.FINISHED_LENGTH, 3),
        ({"stop_token_ids": [9]}, [5, 9], SequenceStatus.FINISHED_STOPPED, 2),
        ({"min_tokens": 3, "max_tokens": 5}, [EOS, EOS, EOS], SequenceStatus.FINISHED_STOPPED, 3),
    ],
)
def test_stop_tokens_and_limits(params, tokens, status, n_out):
    s = make()
    a = seq([1, 2], **params)
    s.add(a)
    for t in tokens:
        step(s, t)
    assert a.status is status and a.num_output_tokens == n_out and a.block_table == []
    if status is SequenceStatus.FINISHED_STOPPED:
        assert a.stop_reason == tokens[-1]


def test_context_length_ends_a_sequence_and_long_prompts_are_refused():
    s = make(max_model_len=4)
    a = seq([1, 2, 3], max_tokens=None)
    s.add(a)
    step(s)
    assert a.status is SequenceStatus.FINISHED_LENGTH
    with pytest.raises(ValueError, match="context"):
        s.add(seq([1, 2, 3, 4]))


def test_abort_from_waiting_and_running_frees_everything():
    s = make()
    a, b = seq([1, 2, 3], "a"), seq([4] * 9, "b")
    s.add(a)
    step(s)
    s.add(b)
    assert s.abort_request("a") == [a]
    s.abort_request("b")
    assert a.status is b.status is SequenceStatus.FINISHED_ABORTED
    assert s.block_manager.num_free_blocks == 16 and not s.has_unfinished()
    s.abort([a])  # aborting twice is harmless


def test_prefix_hit_skips_cached_tokens_unless_prompt_logprobs_are_asked():
    s = make(block_size=2)
    a = seq([1, 2, 3, 4, 5])
    s.add(a)
    step(s)
    b = seq([1, 2, 3, 4, 6])
    s.add(b)
    batch = step(s)
    assert batch.num_tokens[-1] == 1 and b.num_cached_tokens == 4
    c = seq([1, 2, 3, 4, 6], prompt_logprobs=1)
    s.add(c)
    assert step(s).num_tokens[-1] == 5 and c.num_cached_tokens == 0


def test_the_pool_must_hold_one_full_sequence():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        make(num_blocks=2, block_size=4, max_model_len=16)


def test_finish_with_an_error_frees_blocks_and_postprocess_skips_it():
    s = make()
    a, b = seq([1, 2], "a"), seq([3, 4], "b")
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.finish(a, SequenceStatus.FINISHED_ERROR)
    got = s.postprocess(batch, [7, 7])
    assert got == [b] and a.block_table == [] and a.output_token_ids == []


# ---- the state machine ----------------------------------------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        spare_blocks=st.integers(0, 4),
        budget=st.integers(1, 20),
        max_num_seqs=st.integers(1, 4),
        caching=st.booleans(),
    )
    def setup(self, block_size, spare_blocks, budget, max_num_seqs, caching):
        self.max_model_len = 12
        num_blocks = -(-self.max_model_len // block_size) + spare_blocks
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.s = Scheduler(
            self.bm,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=self.max_model_len,
            stop_token_ids=[EOS],
        )
        self.seqs: list[Sequence] = []
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> prefix written
        self.n = 0

    @rule(
        prompt=st.lists(st.integers(1, 3), min_size=1, max_size=10),
        max_tokens=st.integers(1, 6),
        ignore_eos=st.booleans(),
        prompt_logprobs=st.booleans(),
    )
    def add(self, prompt, max_tokens, ignore_eos, prompt_logprobs):
        self.n += 1
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            prompt_logprobs=1 if prompt_logprobs else None,
        )
        x = Sequence(f"r{self.n}", prompt, params)
        self.s.add(x)
        self.seqs.append(x)

    @rule(bits=st.integers(0, 4**8 - 1), error=st.integers(-1, 7))
    def step(self, bits, error):
        tokens = [(bits >> (2 * i)) & 3 for i in range(8)]  # 8 made-up tokens in 0..3
        s, bs = self.s, self.bm.block_size
        batch = s.schedule()
        assert batch.total_tokens <= s.max_num_batched_tokens
        assert len(batch) <= s.max_num_seqs and len(s.running) <= s.max_num_seqs
        assert len({x.seq_id for x in batch.seqs}) == len(batch)
        if s.has_unfinished() and batch.is_empty:
            assert batch.preempted, "no progress and no preemption"
        for x, n in zip(batch.seqs, batch.num_tokens, strict=True):
            assert x.status is SequenceStatus.RUNNING and n >= 1
            start = x.num_computed_tokens
            assert len(x.block_table) * bs >= start + n
            for p in range(start, start + n):  # the runner writes K/V of each new position
                self.kv[(x.block_table[p // bs], p % bs)] = tuple(x.token_ids[: p + 1])
        if 0 <= error < len(batch):
            s.finish(batch.seqs[error], SequenceStatus.FINISHED_ERROR)
        sampled = [tokens[i % 8] if need else None for i, need in enumerate(batch.needs_sample)]
        s.postprocess(batch, sampled)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data(), tail=st.lists(st.integers(1, 3), max_size=3))
    def add_sharing_a_prefix(self, data, tail):  # prefix-cache hits, partial and whole
        other = data.draw(st.sampled_from(self.seqs))
        cut = data.draw(st.integers(1, min(other.num_tokens, 10 - len(tail))))
        self.add(
            prompt=other.token_ids[:cut] + tail,
            max_tokens=3,
            ignore_eos=True,
            prompt_logprobs=False,
        )

    @precondition(lambda self: any(not x.is_finished for x in self.seqs))
    @rule(data=st.data())
    def abort(self, data):
        x = data.draw(st.sampled_from([x for x in self.seqs if not x.is_finished]))
        s = self.s
        s.abort_request(x.request_id)

    @precondition(lambda self: bool(self.s.running))
    @rule(data=st.data())
    def stop_string(self, data):  # the engine ends a sequence on a stop string
        x = data.draw(st.sampled_from(self.s.running))
        self.s.finish(x, SequenceStatus.FINISHED_STOPPED)

    @invariant()
    def pool_is_consistent(self):
        bm = self.bm
        live = [x for x in self.seqs if not x.is_finished]
        holders = [0] * bm.num_blocks
        for x in live:
            for b in x.block_table:
                holders[b] += 1
        assert holders == bm.ref_counts, "leak or double free"
        assert min(bm.ref_counts, default=0) >= 0
        free = list(bm._free_empty) + list(bm._free_cached)
        assert len(free) == len(set(free)), "a block is free twice"
        assert set(free) == {b for b, h in enumerate(holders) if h == 0}
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        for x in self.seqs:
            if x.is_finished:
                assert x.block_table == [] and x not in self.s.running
            elif x.status is SequenceStatus.WAITING:
                assert x.block_table == [] and x.num_computed_tokens == 0
            else:
                assert x in self.s.running and x.num_computed_tokens <= x.num_tokens
        assert len(self.s.running) + len(self.s.waiting) == len(live)

    @invariant()
    def computed_positions_hold_their_own_prefix(self):
        bs = self.bm.block_size
        for x in self.s.running:
            for p in range(x.num_computed_tokens):
                got = self.kv.get((x.block_table[p // bs], p % bs))
                assert got == tuple(x.token_ids[: p + 1]), f"{x}: position {p} holds {got}"

    def teardown(self):
        if not hasattr(self, "s"):
            return
        for _ in range(5000):  # everything left runs to completion and frees its blocks
            if not self.s.has_unfinished():
                break
            self.step(0x5555, -1)  # token 1, never EOS
        self.pool_is_consistent()
        assert not self.s.has_unfinished()
        assert self.bm.num_free_blocks == self.bm.num_blocks


SchedulerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase
