"""Structured outputs: a grammar matcher per constrained sequence, and the token masks of a step.

A request's `StructuredOutputsParams` becomes an llguidance grammar (`grammar_for`), compiled
against the model's vocabulary into one `LLMatcher` per sequence when the request is added. Each
step, the masks of every constrained row that samples are computed together, by llguidance's
executor, in a worker thread that runs while the model computes the logits (`begin`); the runner
waits for them only before sampling (`PendingMasks.wait`) and the sampler adds them to the logits
on the logits' device as a bias of 0 (allowed) or -inf. On the CPU the worker also unpacks the
bitmask into that bias (numpy, off the critical path); for an accelerator the packed bitmask (32
times smaller) crosses and is unpacked there. After the step the engine feeds each sampled token to its matcher (`accept`).

A matcher's state is the output tokens it has accepted, and those survive preemption: a preempted
sequence recomputes its KV cache, not its tokens, so the matcher needs no rollback.

Unconstrained batches never reach this module; the llguidance tokenizer (about a second to build
for a 128k vocabulary) is made on the first constrained request. docs/structured-outputs.md says
why llguidance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import numpy as np
import torch

from nucleus.sampling_params import StructuredOutputsParams
from nucleus.transfer import to_device

# JSON as people write it: `{"a": 1, "b": [2, 3]}`, one space after `:` and `,`, no other
# whitespace. Flexible whitespace lets a small model fill its budget with newlines. A schema's
# own "x-guidance" options override these.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(constraint: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint, checked (no vocabulary needed).

    Raises:
        ValueError: the schema, expression or grammar does not compile; the message names which
            and says why.
    """
    if constraint.json is not None or constraint.json_object:
        kind = "json"
        schema = {"type": "object"} if constraint.json_object else constraint.json
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as e:
            raise ValueError(f"invalid JSON Schema: {e}") from None
    elif constraint.regex is not None:
        kind = "regex"
        grammar = llguidance.LLMatcher.grammar_from_regex(constraint.regex)
    elif constraint.choice is not None:
        kind = "choice"
        grammar = llguidance.grammar_from("choice", json.dumps(list(constraint.choice)))
    else:
        kind = "grammar"
        try:  # Lark as it is; GBNF (`::=` rules) converted to Lark
            grammar = llguidance.grammar_from("grammar", constraint.grammar)
        except ValueError as e:
            raise ValueError(f"invalid grammar: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid {_NAMES[kind]}: {error}")
    return grammar


_NAMES = {
    "json": "JSON Schema",
    "regex": "regular expression",
    "choice": "choice",
    "grammar": "grammar",
}


def llguidance_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a nucleus tokenizer: token bytes and the stop tokens, for a model whose
    logits have `vocab_size` columns (ids past the tokenizer's own are never allowed)."""
    stops = sorted(tokenizer.stop_tokens)
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer: a `tokenizers.Tokenizer`
    if inner is not None and hasattr(inner, "to_str"):
        return llguidance.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=stops)
    model = getattr(tokenizer, "model", None)  # nucleus.Tokenizer: a tiktoken Encoding
    if model is not None and hasattr(model, "_mergeable_ranks"):
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(model, n_vocab=vocab_size, eos_token=stops)
    raise TypeError(
        f"structured outputs need a tiktoken or `tokenizers` tokenizer, not {type(tokenizer)}"
    )


def bitmask_to_bias(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask (bit `t % 32` of word `t // 32` set where token `t` is allowed) as an
    additive float32 bias: 0 where allowed, -inf elsewhere; on the bitmask's device."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]
    zero = torch.zeros((), dtype=torch.float32, device=bitmask.device)
    return torch.where(allowed, zero, float("-inf"))


def _bitmask_to_bias_numpy(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`bitmask_to_bias` for the CPU, with numpy's `unpackbits` (no torch threads needed, so it
    runs beside the forward without competing for them)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(np.where(bits[:, :vocab_size], np.float32(0), np.float32(-np.inf)))


class PendingMasks:
    """The masks of one step's constrained rows, being computed in the worker thread."""

    def __init__(
        self, rows: list[int], done: Future[tuple[torch.Tensor, list[int]]], vocab_size: int
    ) -> None:
        self.rows = rows  # positions among the step's sampled rows
        self._done = done
        self._vocab_size = vocab_size

    def wait(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, bias)` on `device` once computed: the rows' positions among the sampled rows,
        and their `(len(rows), V)` additive bias (0 allowed, -inf not)."""
        bias, _ = self._done.result()
        if bias.dtype == torch.int32:  # a bitmask for an accelerator: unpacked there
            bias = bitmask_to_bias(bias.to(device, non_blocking=True), self._vocab_size)
        rows = to_device(self.rows, torch.int64, device)
        return rows, bias.to(device, non_blocking=True)

    @property
    def blocked(self) -> set[int]:
        """Positions (among the sampled rows) whose constraint allows no token at all."""
        return {self.rows[k] for k in self._done.result()[1]}

    def finish(self) -> None:
        """Wait without using the masks (the step failed): the matchers are free again."""
        self._done.exception()


class StructuredOutputs:
    """The engine's structured-output state: the llguidance tokenizer, the mask worker."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None

    def matchers(self, constraint: StructuredOutputsParams, n: int) -> list[llguidance.LLMatcher]:
        """`n` fresh matchers for a request's constraint.

        Raises:
            ValueError: the constraint does not compile (for this vocabulary).
        """
        grammar = grammar_for(constraint)
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance_tokenizer(self.tokenizer, self.vocab_size)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the output constraint does not compile: {matcher.get_error()}")
        return [matcher] + [matcher.deep_copy() for _ in range(n - 1)]

    def begin(
        self, matchers: Sequence[llguidance.LLMatcher | None], device: torch.device
    ) -> PendingMasks | None:
        """Start computing the masks of the rows that have a matcher (None: no constrained row)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._worker is None:
            self._executor = llguidance.LLExecutor()
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="nucleus-masks")
        jobs = [(matchers[i], k) for k, i in enumerate(rows)]
        done = self._worker.submit(self._compute, jobs, torch.device(device))
        return PendingMasks(rows, done, self.vocab_size)

    def _compute(
        self, jobs: list[tuple[llguidance.LLMatcher, int]], device: torch.device
    ) -> tuple[torch.Tensor, list[int]]:
        """In the worker: the bitmask of every job, then (on the CPU) the bias it gives."""
        # Imported here: llguidance.torch compiles a function with torch.compile when imported
        # (seconds), which no unconstrained request should pay for.
        from llguidance.torch import fill_next_token_bitmask_par

        bitmask = torch.zeros(len(jobs), (self.vocab_size + 31) // 32, dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor, jobs, bitmask)
        blocked = (bitmask == 0).all(dim=1).nonzero().flatten().tolist()
        if device.type != "cpu":
            return (bitmask.pin_memory() if device.type == "cuda" else bitmask), blocked
        return _bitmask_to_bias_numpy(bitmask, self.vocab_size), blocked

    @staticmethod
    def accept(matcher: llguidance.LLMatcher, token: int) -> str | None:
        """Advance a matcher by a sampled token; returns an error message if it refused it."""
        if matcher.consume_token(token):
            return None
        reason = matcher.get_error().splitlines()[0]  # the rest is the parser's state dump
        return f"the sampled token {token} breaks the output constraint: {reason}"
