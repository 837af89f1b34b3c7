"""Incremental detokenization with stop strings, over any tokenizer with `decode(ids) -> str`.

Text is released only when it is final:
- a token may end in the middle of a UTF-8 character; `decode` then ends in U+FFFD, and nothing is
  released until a later token completes the character (or the sequence ends);
- text that could be the start of a stop string is held back until it is known not to be one, so
  text is never released and then retracted;
- a stop string ends the text before it (the stop string itself is not part of the output).

Decoding uses a window, not the whole output: `prefix_offset..read_offset` are the tokens of the
last released piece (decoded again for context, so that tokenizers that drop a leading space when
decoding a lone token still decode correctly), `read_offset..` are the tokens not yet released.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """The output text of one sequence, built token by token.

    Args:
        tokenizer: anything with `decode(ids) -> str` (bytes decoded with errors="replace").
        stop: stop strings; the text ends before the first one that occurs.
        skip_token_ids: ids left out of the text (special tokens when skipping them).
        context_ids: a few prompt tokens decoded as left context only (never part of the text);
            leave empty for byte-level tokenizers (tiktoken, GPT-2 style), which need none.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        *,
        stop: Iterable[str] = (),
        skip_token_ids: Collection[int] = frozenset(),
        context_ids: Iterable[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.skip_token_ids = frozenset(skip_token_ids)
        self._ids: list[int] = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # all final text so far (before any stop string)
        self._released = 0  # characters of `text` handed out
        self._last_added = 0  # characters the last decode added to `text`
        self.stop_reason: str | None = None  # the stop string found, if any

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add(self, token_ids: Iterable[int], *, check_stop: bool = True) -> str:
        """Add new output tokens; returns the text that became final (possibly "").

        After a stop string is found, `stopped` is True and further tokens are ignored.
        `check_stop=False` (e.g. under `min_tokens`) neither looks for stop strings nor holds text
        back for them.
        """
        if self.stopped:
            return ""
        new = [t for t in token_ids if t not in self.skip_token_ids]
        if new:
            self._ids.extend(new)
            self._decode_new()
        if check_stop and self.stop:
            self._find_stop(len(self.text) - self._last_added)
        return self._release(hold=check_stop and not self.stopped)

    def flush(self) -> str:
        """At the end of the sequence: release everything held, including a dangling partial
        character (as U+FFFD, which is how `decode` renders it)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
            full = self.tokenizer.decode(self._ids[self._prefix_offset :])
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
            if self.stop:
                self._find_stop(len(self.text) - len(full) + len(prefix))
        return self._release(hold=False)

    # ---- internals --------------------------------------------------------------------------
    def _decode_new(self) -> None:
        self._last_added = 0
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            delta = full[len(prefix) :]
            self.text += delta
            self._last_added = len(delta)
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _find_stop(self, new_from: int) -> None:
        """Cut `text` before the earliest stop string that ends in text added since `new_from`."""
        # Never before released text: nothing released is ever retracted.
        start = max(self._released, new_from - self._max_stop + 1, 0)
        best = -1
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best, found = i, s
        if best != -1:
            self.text = self.text[:best]
            self.stop_reason = found

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        tail = self.text[self._released :]
        for k in range(min(len(tail), self._max_stop - 1), 0, -1):
            end = tail[-k:]
            if any(len(s) > k and s.startswith(end) for s in self.stop):
                return k
        return 0

    def _release(self, *, hold: bool) -> str:
        end = len(self.text) - (self._held() if hold and self.stop else 0)
        if end <= self._released:
            return ""
        out = self.text[self._released : end]
        self._released = end
        return out
