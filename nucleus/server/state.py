"""What the routes of one app share: the engine, the settings, the live counters, and the
threads that tokenize (so that the event loop never does)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from nucleus.server.limits import ServerLimits
from nucleus.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from nucleus.server.run import Run

__all__ = ["ServerState", "maybe_await"]

logger = logging.getLogger("nucleus.server")

T = TypeVar("T")

# Tokenizing and rendering chat templates take CPU time in proportion to what the client sent;
# two threads keep that off the event loop without letting it crowd out the engine's thread.
_WORKER_THREADS = 2


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
        limits: ServerLimits,
        metrics: ServerMetrics,
    ) -> None:
        self.engine = engine
        self.names = names
        self.api_key = api_key
        self.limits = limits
        self.metrics = metrics
        self.pending = 0  # sequences submitted whose prompt has not yet produced anything
        self.draining = False  # set on shutdown: new requests get 503
        self.runs: set[Run] = set()  # the runs in flight (for aborting them at shutdown)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self.vocab_size = _vocab_size(engine)
        self.max_prompt_chars: int | None = getattr(engine, "max_prompt_chars", None)
        # Built on first use and holding the GIL meanwhile: the tokenizer's tables for plain
        # text (0.2-0.7 s for the default model's), now, before anything is served.
        engine.tokenizer.encode_prompt("warm-up")
        self._workers = ThreadPoolExecutor(_WORKER_THREADS, thread_name_prefix="nucleus-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread (tokenizing, rendering a chat template)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._workers, functools.partial(fn, *args))

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

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
