"""One sequence being generated: its tokens, where it stands, and the KV blocks it holds.

A request with `SamplingParams.n > 1` becomes `n` sequences sharing a `request_id`. The scheduler
and the block manager trade only the plain ints and lists kept here; tensors live in the runner.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

from nucleus.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks; computes a chunk of its prompt or decodes
    FINISHED_STOPPED = "stop"  # a stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context length
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # e.g. the logits of this sequence went NaN

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI/vLLM finish reason: "stop", "length", "abort", "error", or None."""
        return self.value if self.is_finished else None


_seq_ids = itertools.count()


class Sequence:
    """The state of one sequence.

    `num_computed_tokens` counts the tokens whose K/V are in the cache (prefix-cache hits included);
    the tokens still to compute are `token_ids[num_computed_tokens:]`. A sequence needs a sampled
    token exactly when a step brings `num_computed_tokens` up to `num_tokens`.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        index: int = 0,
        arrival_time: float = 0.0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a prompt must hold at least one token")
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.params = params
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last admission
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks, filled lazily
        self.num_preemptions = 0
        # Per-sequence seed: the request's seed, offset by the completion index so that the n
        # completions of one seeded request differ but each is reproducible.
        self.seed: int | None = None if params.seed is None else params.seed + index
        self.generator: Any = None  # the runner's torch.Generator for `seed`, made lazily
        # The structured-output matcher (llguidance), for a constrained request: it has accepted
        # every output token so far, so it survives preemption as the tokens do.
        self.grammar: Any = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        # Filled by the runner/engine when requested (never read by the scheduler).
        self.output_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] = []

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, {self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={self.block_table})"
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than one token is left to compute (prompt, or recompute)."""
        return len(self.token_ids) - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
