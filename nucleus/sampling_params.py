"""Per-request sampling parameters, validated when they are made."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the text a request may produce: exactly one of

    - `json`: a JSON Schema (a dict, or its JSON text): the output is one JSON value it accepts;
    - `json_object`: any JSON object;
    - `regex`: a regular expression the whole output matches (Rust `regex` syntax);
    - `grammar`: a context-free grammar, in Lark or GBNF (llama.cpp) syntax;
    - `choice`: the output is exactly one of these strings.

    The names are vLLM's. Only the shape is checked here; whether the schema, expression or grammar
    compiles is checked when the request is added (`nucleus.engine.structured`), and a request
    whose constraint does not compile fails alone with the compiler's message.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"StructuredOutputsParams: {message}")

        given = [
            name
            for name, value in (
                ("json", self.json is not None),
                ("json_object", self.json_object),
                ("regex", self.regex is not None),
                ("grammar", self.grammar is not None),
                ("choice", self.choice is not None),
            )
            if value
        ]
        if len(given) != 1:
            fail(f"give exactly one of json, json_object, regex, grammar, choice (got {given})")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    fail(f"json is not valid JSON text: {e}")
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                fail(f"json must be a JSON Schema (an object), got {type(schema).__name__}")
        if not isinstance(self.json_object, bool):
            fail("json_object must be a bool")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                fail(f"{name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            fail("choice must be a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (the fields vLLM users know).

    `temperature == 0` is greedy. `top_p` follows Meta's `sample_top_p` exactly. `stop` strings end
    the output before the string; `stop_token_ids` (added to the model's own stop tokens unless
    `ignore_eos`) end it with the token left out of the text. `logprobs=N` returns, per generated
    token, its log-probability and the N most likely alternatives; `prompt_logprobs=N` does the same
    for prompt tokens. Log-probabilities are of the raw model distribution, as the reference gives.
    `structured_outputs` constrains the output to a JSON Schema, any JSON object, a regular
    expression, a grammar or a choice of strings (`StructuredOutputsParams`).
    """

    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    min_tokens: int = 0
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"SamplingParams.{name} {message}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: object) -> bool:
            return (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )

        if not is_int(self.n) or self.n < 1:
            fail("n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", f"must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if not is_real(self.temperature) or self.temperature < 0:
            fail("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < 1e-5:
            fail("temperature", f"must be 0 (greedy) or >= 1e-5, got {self.temperature!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            fail("top_k", f"must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_real(value) or not -2 <= value <= 2:
                fail(name, f"must be in [-2, 2], got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", "must be a dict of token id -> bias")
            for token, bias in self.logit_bias.items():
                if not is_int(token) or token < 0:
                    fail("logit_bias", f"keys must be token ids >= 0, got {token!r}")
                if not is_real(bias) or not -100 <= bias <= 100:
                    fail("logit_bias", f"values must be in [-100, 100], got {bias!r}")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", f"must be an integer or None, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            fail("stop", "must be a non-empty string or a list of non-empty strings")
        self.stop_strings = stops
        if self.stop_token_ids is not None and not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "must be a list of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= 20):
                fail(name, f"must be None or an integer in [0, 20], got {value!r}")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            fail("structured_outputs", "must be a StructuredOutputsParams or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
