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
from nucleus.server.run import Run

__all__ = ["SSEResponse", "guarded_sse", "sse"]

logger = logging.getLogger("nucleus.server")


class SSEResponse(StreamingResponse):
    """Server-sent events whose run is closed (its requests aborted) however the stream ends."""

    def __init__(self, content: AsyncIterator[str], run: Run) -> None:
        self._content = content
        self.completed = False
        super().__init__(
            self._track(content),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.run = run

    async def _track(self, content: AsyncIterator[str]) -> AsyncIterator[str]:
        async for chunk in content:
            yield chunk
        self.completed = True

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for it in (self.body_iterator, self._content):
                with contextlib.suppress(Exception):
                    await it.aclose()  # type: ignore[attr-defined]
            await self.run.close()
            if not self.completed:
                scope[OUTCOME] = "client disconnected mid-stream"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def guarded_sse(events: AsyncGenerator[str, None], rid: str) -> AsyncIterator[str]:
    """A stream's events, then `[DONE]`; an error mid-stream becomes one error event, since the
    200 status has already gone out."""
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
