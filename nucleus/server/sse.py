"""Server-sent events: the streaming response of a run, and its event framing."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from nucleus.server.middleware import OUTCOME
from nucleus.server.protocol import APIError, error_body
from nucleus.server.responses import json_safe
from nucleus.server.run import Run

__all__ = ["ChunkEvents", "SSEResponse", "sse"]

logger = logging.getLogger("nucleus.server")


class SSEResponse(StreamingResponse):
    """A run's stream of events, then `data: [DONE]`. An error mid-stream becomes one error
    event, since the 200 status has already gone out; the run is closed (its requests aborted)
    however the stream ends."""

    def __init__(self, events: AsyncGenerator[str, None], run: Run, rid: str) -> None:
        self._events = events
        self.completed = False
        super().__init__(
            self._guarded(events, rid),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.run = run

    async def _guarded(self, events: AsyncGenerator[str, None], rid: str) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(events):  # a disconnect closes the inner stream too
                async for event in events:
                    yield event
        except APIError as exc:
            yield sse(exc.body())
        except Exception as exc:
            logger.exception("stream %s failed", rid)
            yield sse(error_body(f"Internal error: {exc}", "server_error"))
        yield "data: [DONE]\n\n"
        self.completed = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for it in (self.body_iterator, self._events):
                with contextlib.suppress(Exception):
                    await it.aclose()  # type: ignore[attr-defined]
            await self.run.close()
            if not self.completed:
                scope[OUTCOME] = "client disconnected mid-stream"


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def sse(data: dict[str, Any]) -> str:
    return f"data: {_dumps(data)}\n\n"


class ChunkEvents:
    """The events of one stream's chunks, `sse({**head, "choices": [choice], **tail})` each: what
    every chunk repeats (id, model, ...) is encoded once, and a chunk encodes only its choice (a
    stream of 256 sends hundreds of chunks a second)."""

    def __init__(self, head: dict[str, Any], tail: dict[str, Any]) -> None:
        self._before = "data: " + _dumps({**head, "choices": []}).removesuffix("]}")
        self._after = "]" + ("," + _dumps(tail)[1:] if tail else "}") + "\n\n"

    def __call__(self, choice: dict[str, Any]) -> str:
        if choice.get("logprobs") is not None:  # the only floats, which may be infinite
            choice = json_safe(choice)
        return self._before + _dumps(choice) + self._after
