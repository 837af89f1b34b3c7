"""What a request gives back, shaped as vLLM users know it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nucleus.tools import ToolCall

# One entry per token: {token_id: logprob} holding the chosen token and the top-N alternatives.
Logprobs = list[dict[int, float]]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None  # per generated token, when SamplingParams.logprobs is set
    finish_reason: str | None = None  # "stop", "length", "abort", "error", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # why the request failed, with finish_reason "error"
    tool_calls: list[ToolCall] | None = None  # `LLM.chat(tools=...)`: the calls in `text`

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None  # first entry None (no prediction)
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
