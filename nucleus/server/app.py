"""The OpenAI-compatible HTTP app over an `AsyncLLM`.

`build_app(engine, served_model_name=..., api_key=..., max_waiting=...)` gives a FastAPI app with
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both streaming as
server-sent events ending in `data: [DONE]`), `GET /health` and `GET /metrics`.

The server never touches the model: it validates, tokenizes (to check the context limit before
anything reaches the engine), submits, and turns `RequestOutput`s into OpenAI's JSON. Every error
is answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; a client's mistake
is a 4xx, never a 500. A client that goes away (mid-stream or while waiting for a whole answer)
has its requests aborted, so the engine frees their KV blocks.

The parts, by job: `state` (what the routes share), `inputs` (request fields to engine inputs),
`run` (one HTTP request on the engine), `sse` (streaming), `responses` (usage, logprobs),
`completions` and `chat` (the two generation routes), `middleware` (auth, draining, metrics, the
log line).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nucleus.server.chat import create_chat_completion
from nucleus.server.completions import create_completion
from nucleus.server.metrics import CONTENT_TYPE, ServerMetrics
from nucleus.server.middleware import RequestMiddleware
from nucleus.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    validation_error,
)
from nucleus.server.state import ServerState, maybe_await

__all__ = ["DEFAULT_MAX_WAITING", "build_app"]

DEFAULT_MAX_WAITING = 256


def build_app(
    engine: Any,
    *,
    served_model_name: str | list[str] | None = None,
    api_key: str | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    on_shutdown: Callable[[], Awaitable[None] | None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `engine` (an `AsyncLLM`, or anything with its face).

    `served_model_name`: the name(s) clients may ask for (default: `engine.model_name`); the
    first is the one `/v1/models` lists first. `api_key`: when set, every `/v1/` route wants
    `Authorization: Bearer <key>`. `max_waiting`: at most this many requests wait for the engine
    at once; more get 503. `on_shutdown`: called when the app shuts down.
    """
    if served_model_name is None:
        names = [str(getattr(engine, "model_name", "nucleus"))]
    elif isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name)
    metrics = ServerMetrics(stats=lambda: engine.stats())
    state = ServerState(engine, names, api_key, max_waiting, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.draining = True
        if on_shutdown is not None:
            await maybe_await(on_shutdown())

    app = FastAPI(
        title="nucleus",
        description="OpenAI-compatible API over the nucleus engine.",
        version="0.1.0",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    app.state.nucleus = state
    app.state.metrics = metrics

    # -- errors, all in OpenAI's shape ------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ValidationError)
    async def _pydantic_validation(request: Request, exc: ValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        err = APIError(exc.status_code, message)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(RequestMiddleware, state=state)

    # -- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not getattr(state.engine, "is_running", True):  # the engine thread has stopped
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict[str, Any]:
        return ModelCard(
            id=name, created=state.created, max_model_len=state.max_model_len
        ).model_dump()

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in state.names]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def get_model(model: str) -> dict[str, Any]:
        if model not in state.names:
            raise APIError.model_not_found(model)
        return model_card(model)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    return app
