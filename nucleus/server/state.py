"""What the routes of one app share: the engine, the settings, the live counters."""

from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from nucleus.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from nucleus.server.run import Run

__all__ = ["ServerState", "maybe_await"]

logger = logging.getLogger("nucleus.server")


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _vocab_size(engine: Any) -> int | None:
    """The token ids a client may send: below both the tokenizer's and the model's sizes."""
    sizes = []
    candidates = [
        getattr(engine, "vocab_size", None),
        getattr(getattr(engine, "model_config", None), "vocab_size", None),
        getattr(
            getattr(getattr(getattr(engine, "engine", None), "model", None), "config", None),
            "vocab_size",
            None,
        ),
        getattr(engine.tokenizer, "n_words", None),
    ]
    for value in candidates:
        if isinstance(value, int) and value > 0:
            sizes.append(value)
    return min(sizes) if sizes else None


class ServerState:
    """What the routes share: the engine, the settings, the live counters."""

    def __init__(
        self,
        engine: Any,
        names: list[str],
        api_key: str | None,
        max_waiting: int,
        metrics: ServerMetrics,
    ) -> None:
        self.engine = engine
        self.names = names
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.pending = 0  # requests submitted that have not yet produced anything
        self.draining = False  # set on shutdown: new requests get 503
        self.runs: set[Run] = set()  # the runs in flight (for aborting them at shutdown)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self.vocab_size = _vocab_size(engine)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    def engine_stats(self) -> dict:
        try:
            return dict(self.engine.stats() or {})
        except Exception:
            logger.exception("engine.stats() failed")
            return {}

    def abort_all(self) -> int:
        """Abort every engine request in flight (shutdown timeout): each stream then ends with
        finish_reason "abort" and `[DONE]`. Returns how many HTTP requests were affected."""
        runs = list(self.runs)
        for run in runs:
            run.abort()
        return len(runs)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            try:
                text = self.engine.tokenizer.decode([token_id])
            except Exception:
                text = ""
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text
