"""Auth, draining, the request body's limits, metrics and one log line per request: a plain ASGI
middleware, so streaming and disconnects pass through untouched.

The body is read here, whole, before any route sees it: a body over `max_body_bytes` gets 413 as
soon as that is known (from its Content-Length, before reading it), one that has not arrived
within `body_timeout` seconds gets 408; both close the connection, and nothing past the limit is
kept. (HTTP clients that send a whole body before they read, httpx among them, still read an
early answer.) A client that hangs up while sending is logged and counted as 499 (it never gets
an answer), not as a bad request."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse

from nucleus.server.limits import ServerLimits
from nucleus.server.protocol import APIError
from nucleus.server.run import ClientGone
from nucleus.server.state import ServerState

__all__ = ["OUTCOME", "RequestMiddleware"]

logger = logging.getLogger("nucleus.server")

OUTCOME = "nucleus.outcome"  # scope key: how a request ended, when not plainly
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: dict) -> bool:
    length = _header(scope, b"content-length")
    return (length is not None and length.strip() != "0") or _header(
        scope, b"transfer-encoding"
    ) is not None


async def _read_body(scope: dict, receive: Any, limits: ServerLimits) -> bytes:
    """The whole body, within the size and time limits (APIError 413 or 408 otherwise);
    ClientGone if the client hangs up first."""
    too_large = APIError(
        413,
        f"The request body is larger than this server's limit of {limits.max_body_bytes} bytes.",
        code="request_too_large",
    )
    length = _header(scope, b"content-length")
    if length and length.strip().isdigit() and int(length) > limits.max_body_bytes:
        raise too_large
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"The request body did not arrive within {limits.body_timeout:g} seconds.",
            code="request_timeout",
        ) from None
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that gives the body read already, then the client's own messages (its
    disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict:
        return pending.pop() if pending else await receive()

    return receive_again


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
        unread_body = _has_body(scope)

        async def send_wrapper(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        async def reply(err: APIError) -> None:
            headers = dict(err.headers or {})
            if err.status == 401:
                headers["www-authenticate"] = "Bearer"
            if unread_body:  # what is left of it must not be read as the next request
                headers["connection"] = "close"
            response = JSONResponse(err.body(), status_code=err.status, headers=headers)
            await response(scope, receive, send_wrapper)

        outcome = ""
        limits = self.state.limits
        try:
            if path.startswith("/v1/") and self.state.draining:
                await reply(
                    APIError.unavailable(
                        "The server is shutting down.", "shutting_down", limits.retry_after
                    )
                )
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
                try:
                    body = await _read_body(scope, receive, limits)
                except APIError as err:
                    reason = "body_too_large" if err.status == 413 else "body_timeout"
                    self.state.metrics.rejected.labels(reason).inc()
                    unread_body = True
                    await reply(err)
                else:
                    unread_body = False
                    await self.app(scope, _replay(body, receive), send_wrapper)
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
