"""Structured outputs: a grammar matcher per constrained sequence, and the token masks of a step.

A request's `StructuredOutputsParams` becomes an llguidance grammar (`grammar_for`), compiled
against the model's vocabulary into one `LLMatcher` per sequence when the request is added. Each
step, the masks of every constrained row that samples are computed together, by llguidance's
executor, in a worker thread that runs while the model computes the logits (`begin`); the runner
waits for them only before sampling (`PendingMasks.wait`) and the sampler applies them on the
logits' device. After the step the engine feeds each sampled token to its matcher (`accept`).

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
import torch
from llguidance.torch import fill_next_token_bitmask_par

from nucleus.sampling_params import StructuredOutputsParams

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


class PendingMasks:
    """The masks of one step's constrained rows, being computed in the worker thread."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor, done: Future[None]) -> None:
        self.rows = rows  # positions among the step's sampled rows
        self.bitmask = bitmask  # (len(rows), ceil(V / 32)) int32 on the CPU; bit set: allowed
        self._done = done

    def wait(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, bitmask)` on `device`, once computed."""
        self._done.result()
        rows = torch.tensor(self.rows, dtype=torch.int64).to(device, non_blocking=True)
        return rows, self.bitmask.to(device, non_blocking=True)

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

    def begin(self, matchers: Sequence[llguidance.LLMatcher | None]) -> PendingMasks | None:
        """Start computing the masks of the rows that have a matcher (None: no constrained row)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._worker is None:
            self._executor = llguidance.LLExecutor()
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="nucleus-masks")
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(rows), words, dtype=torch.int32)
        if torch.cuda.is_available():
            bitmask = bitmask.pin_memory()
        jobs = [(matchers[i], k) for k, i in enumerate(rows)]
        done = self._worker.submit(fill_next_token_bitmask_par, self._executor, jobs, bitmask)
        return PendingMasks(rows, bitmask, done)

    @staticmethod
    def accept(matcher: llguidance.LLMatcher, token: int) -> str | None:
        """Advance a matcher by a sampled token; returns an error message if it refused it."""
        if matcher.consume_token(token):
            return None
        return f"the sampled token {token} breaks the output constraint: {matcher.get_error()}"
