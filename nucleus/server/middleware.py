"""Auth, draining, metrics and one log line per request: a plain ASGI middleware, so streaming
and disconnects pass through untouched."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse

from nucleus.server.protocol import APIError
from nucleus.server.run import ClientGone
from nucleus.server.state import ServerState

__all__ = ["OUTCOME", "RequestMiddleware"]

logger = logging.getLogger("nucleus.server")

OUTCOME = "nucleus.outcome"  # scope key: how a request ended, when not plainly
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class RequestMiddleware:
    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    def _authorized(self, scope: dict) -> bool:
        key = self.state.api_key
        if not key:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(token.strip().encode(), key.encode())
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        route = (
            path
            if path in _ROUTES
            else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        )
        status: int | None = None
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        async def reply(err: APIError) -> None:
            headers = {"www-authenticate": "Bearer"} if err.status == 401 else None
            response = JSONResponse(err.body(), status_code=err.status, headers=headers)
            await response(scope, receive, send_wrapper)

        outcome = ""
        try:
            if path.startswith("/v1/") and self.state.draining:
                await reply(APIError(503, "The server is shutting down.", code="shutting_down"))
            elif path.startswith("/v1/") and not self._authorized(scope):
                has_header = any(n == b"authorization" for n, _ in scope.get("headers", []))
                await reply(
                    APIError.unauthorized(
                        "Incorrect API key provided."
                        if has_header
                        else "You didn't provide an API key. Pass it as 'Authorization: Bearer KEY'."
                    )
                )
            else:
                await self.app(scope, receive, send_wrapper)
        except ClientGone:
            outcome = " client disconnected"
            status = status or 499
        except Exception as exc:
            if type(exc).__name__ == "ClientDisconnect":
                outcome = " client disconnected"
                status = status or 499
            else:
                logger.exception("unhandled error on %s %s", scope.get("method"), path)
                if not started:
                    with contextlib.suppress(Exception):
                        await reply(APIError(500, "Internal server error."))
                status = status or 500
        except asyncio.CancelledError:
            outcome = " cancelled"
            status = status or 499
            raise
        finally:
            elapsed = time.perf_counter() - start
            if not outcome and scope.get(OUTCOME):
                outcome = f" {scope[OUTCOME]}"
            self.state.metrics.requests.labels(route, str(status or 0)).inc()
            client = scope.get("client") or ("-", 0)
            logger.info(
                '%s:%s "%s %s" %s %.3fs%s',
                client[0],
                client[1],
                scope.get("method", "-"),
                path,
                status,
                elapsed,
                outcome,
            )
