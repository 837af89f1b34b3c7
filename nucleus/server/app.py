"""The OpenAI-compatible HTTP app over an `AsyncLLM`.

`build_app(engine, served_model_name=..., api_key=..., max_waiting=...)` gives a FastAPI app with
`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both streaming as
server-sent events ending in `data: [DONE]`), `GET /health` and `GET /metrics`.

The server never touches the model: it validates, tokenizes (to check the context limit before
anything reaches the engine), submits, and turns `RequestOutput`s into OpenAI's JSON. Every error
is answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; a client's mistake
is a 4xx, never a 500. A client that goes away (mid-stream or while waiting for a whole answer)
has its requests aborted, so the engine frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nucleus.async_llm import EngineDeadError, QueueFull
from nucleus.outputs import RequestOutput
from nucleus.sampling_params import SamplingParams
from nucleus.server.metrics import CONTENT_TYPE, ServerMetrics, engine_stat
from nucleus.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    error_body,
    random_id,
    validation_error,
)

__all__ = ["DEFAULT_MAX_WAITING", "build_app"]

logger = logging.getLogger("nucleus.server")

DEFAULT_MAX_WAITING = 256
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
_SP_FIELD = re.compile(r"SamplingParams\.(\w+)")


_OUTCOME = "nucleus.outcome"  # scope key: how a request ended, when not plainly


class _ClientGone(Exception):
    """The client disconnected before its answer was ready; nothing is sent."""


@dataclass
class _Prompt:
    text: str | None  # as the client sent it, when it sent text
    ids: list[int]


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


class _State:
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
        self.runs: set[_Run] = set()  # the runs in flight (for aborting them at shutdown)
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


# --------------------------------------------------------------------------------------------
# Running requests on the engine


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _Run:
    """One HTTP request's engine requests (one per prompt), merged into one stream of outputs.

    Admission (the waiting-queue bound) happens in the constructor, so a full queue is a 503
    before anything is streamed. `close()` aborts whatever has not finished; it is idempotent.
    """

    def __init__(
        self,
        state: _State,
        prompts: list[_Prompt],
        params: SamplingParams,
        base_id: str,
        arrival: float,
    ) -> None:
        waiting = max(state.pending, int(engine_stat(state.engine_stats(), "waiting")))
        if waiting + len(prompts) > state.max_waiting:
            state.metrics.rejected.labels("queue_full").inc()
            raise APIError.overloaded(
                f"The server is overloaded: {waiting} request(s) are waiting (at most "
                f"{state.max_waiting}). Please retry later."
            )
        self.state = state
        self.prompts = prompts
        self.params = params
        self.arrival = arrival
        self.request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._not_started = set(range(len(prompts)))  # counted in state.pending
        self._finished: set[int] = set()
        self._closed = False
        # per (prompt, output index): tokens seen and when the last one came
        self._seen: dict[tuple[int, int], tuple[int, float]] = {}
        self._first_token: set[int] = set()
        self._done: set[tuple[int, int]] = set()
        state.pending += len(prompts)
        state.runs.add(self)
        state.metrics.prompt_tokens.inc(sum(len(p.ids) for p in prompts))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.prompts))]

    async def _pump(self, i: int) -> None:
        try:
            stream = await _maybe_await(
                self.state.engine.generate(self.prompts[i].ids, self.params, self.request_ids[i])
            )
            try:
                async for out in stream:
                    self._queue.put_nowait((i, out, None))
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue.put_nowait((i, None, exc))
            return
        self._queue.put_nowait((i, None, None))

    def _started(self, i: int) -> None:
        if i in self._not_started:
            self._not_started.discard(i)
            self.state.pending -= 1

    def _observe(self, i: int, out: RequestOutput, now: float) -> None:
        m = self.state.metrics
        for o in out.outputs:
            count, last = self._seen.get((i, o.index), (0, self.arrival))
            new = len(o.token_ids) - count
            if new > 0:
                m.generation_tokens.inc(new)
                if i not in self._first_token:
                    self._first_token.add(i)
                    m.ttft.observe(now - self.arrival)
                    new_itl = new - 1
                else:
                    new_itl = new
                for _ in range(min(new_itl, 64)):
                    m.itl.observe((now - last) / new)
                self._seen[(i, o.index)] = (len(o.token_ids), now)
            if o.finish_reason is not None and (i, o.index) not in self._done:
                self._done.add((i, o.index))
                m.finished.labels(o.finish_reason).inc()
        if out.finished:
            m.e2e.observe(now - self.arrival)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they come; ends when every request ended."""
        if not self._tasks:
            self.start()
        remaining = len(self.prompts)
        try:
            while remaining:
                i, out, exc = await self._queue.get()
                self._started(i)
                if exc is not None:
                    raise _engine_error(exc)
                if out is None:
                    remaining -= 1
                    self._finished.add(i)  # the engine's stream ended: nothing to abort
                    continue
                self._observe(i, out, time.perf_counter())
                if out.finished:
                    self._finished.add(i)
                yield i, out
        finally:
            await self.close()

    def abort(self) -> list[asyncio.Future]:
        """Asks the engine to abort every request of this run not yet finished (their streams
        then end with finish_reason "abort"); returns the engine's awaitables, if any."""
        waits: list[asyncio.Future] = []
        for i, rid in enumerate(self.request_ids):
            if i in self._finished:
                continue
            try:
                result = self.state.engine.abort(rid)
            except Exception:
                logger.exception("engine.abort(%s) failed", rid)
                continue
            if inspect.isawaitable(result):
                waits.append(asyncio.ensure_future(result))
        return waits

    async def close(self) -> None:
        """Aborts every request not yet finished, then stops the pumps.

        The aborts are issued before the first await, so they happen even when the task
        closing the run is being cancelled (a client hanging up mid-stream)."""
        if self._closed:
            return
        self._closed = True
        self.state.runs.discard(self)
        for i in list(self._not_started):
            self._started(i)
        waits = self.abort()
        for task in self._tasks:
            task.cancel()
        waits += self._tasks
        if waits:
            await asyncio.shield(asyncio.gather(*waits, return_exceptions=True))


def _engine_error(exc: Exception) -> Exception:
    """The engine refused a request: its ValueErrors are the client's mistakes (400); a full
    queue or a stopped engine is a 503."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError.overloaded(f"The server is overloaded: {exc}. Please retry later.")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not running: {exc}", code="engine_unavailable")
    if isinstance(exc, ValueError):
        return _value_error(exc)
    return exc


def _value_error(exc: ValueError, rename: dict[str, str] | None = None) -> APIError:
    match = _SP_FIELD.search(str(exc))
    param = None
    if match:
        param = match.group(1)
        param = (rename or {}).get(param, param)
    message = _SP_FIELD.sub(lambda m: (rename or {}).get(m.group(1), m.group(1)), str(exc))
    return APIError.bad_request(message, param=param)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a stray body message: look again a moment later


async def _collect(run: _Run, request: Request) -> dict[int, RequestOutput]:
    """The final output of each prompt; aborts everything if the client goes away first."""
    finals: dict[int, RequestOutput] = {}

    async def consume() -> None:
        async for i, out in run.events():
            finals[i] = out

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()
            return finals
        raise _ClientGone()
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
        await run.close()


class _SSEResponse(StreamingResponse):
    """Server-sent events whose run is closed (its requests aborted) however the stream ends."""

    def __init__(self, content: AsyncIterator[str], run: _Run) -> None:
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
                scope[_OUTCOME] = "client disconnected mid-stream"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _guarded_sse(events: AsyncGenerator[str, None], rid: str) -> AsyncIterator[str]:
    """A stream's events, then `[DONE]`; an error mid-stream becomes one error event, since the
    200 status has already gone out."""
    try:
        async with contextlib.aclosing(events):  # a disconnect closes the inner stream too
            async for event in events:
                yield event
    except APIError as exc:
        yield _sse(exc.body())
    except Exception as exc:
        logger.exception("stream %s failed", rid)
        yield _sse(error_body(f"Internal error: {exc}", "server_error"))
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# Turning requests into engine inputs


def _check_model(state: _State, model: str | None) -> str:
    if model is None:
        return state.names[0]
    if model not in state.names:
        raise APIError.model_not_found(model)
    return model


def _check_ids(state: _State, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError.bad_request("The prompt is empty.", param=param)
    vocab = state.vocab_size
    if vocab is not None:
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError.bad_request(
                    f"Token id {t} is out of range: the vocabulary has {vocab} tokens.",
                    param=param,
                )


def _check_context(state: _State, n_prompt: int, max_tokens: int | None, kind: str, param: str):
    limit = state.max_model_len
    if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
        asked = n_prompt + (max_tokens or 0)
        raise APIError.bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{asked} tokens ({n_prompt} in the {kind}, {max_tokens or 0} in the completion). "
            f"Please reduce the length of the {kind} or completion.",
            param=param if n_prompt + (max_tokens or 0) > limit and n_prompt < limit else kind,
            code="context_length_exceeded",
        )


def _sampling_params(
    state: _State,
    req: Any,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    rename: dict[str, str],
) -> SamplingParams:
    bias: dict[int, float] | None = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise APIError.bad_request(
                    f"Invalid key in 'logit_bias': {key!r} is not a token id.", param="logit_bias"
                ) from None
            if token < 0 or (state.vocab_size is not None and token >= state.vocab_size):
                raise APIError.bad_request(
                    f"Invalid key in 'logit_bias': token id {token} is out of range.",
                    param="logit_bias",
                )
            bias[token] = float(value)
    if req.stop_token_ids and state.vocab_size is not None:
        for t in req.stop_token_ids:
            if t >= state.vocab_size:
                raise APIError.bad_request(
                    f"Token id {t} in 'stop_token_ids' is out of range.", param="stop_token_ids"
                )
    stop = None if req.stop == [] else req.stop
    kwargs: dict[str, Any] = {
        "n": req.n if req.n is not None else 1,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": bias,
        "seed": req.seed,
        "stop": stop,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "top_k": -1 if req.top_k is None else req.top_k,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "min_tokens": req.min_tokens or 0,
        "ignore_eos": bool(req.ignore_eos),
        "stop_token_ids": req.stop_token_ids or None,
        "skip_special_tokens": req.skip_special_tokens is not False,
    }
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise _value_error(exc, rename) from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish_reason(reason: str | None) -> str | None:
    return reason


def _raise_if_error(out: RequestOutput) -> None:
    for o in out.outputs:
        if o.finish_reason == "error":
            raise APIError(500, f"The engine failed on this request: {o.error or 'unknown'}")


# --------------------------------------------------------------------------------------------
# Logprobs in OpenAI's two shapes


def _top(entry: dict[int, float] | None, k: int) -> list[tuple[int, float]]:
    if not entry or k <= 0:
        return []
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def _completion_logprobs(
    state: _State,
    token_ids: list[int],
    entries: list[dict[int, float] | None] | None,
    k: int,
    offset: int,
    first_is_none: bool = False,
    first_is_hidden: bool = False,
) -> tuple[dict[str, list], int]:
    """OpenAI's legacy shape for a run of tokens; returns it and the text offset after them.

    `first_is_hidden`: the first token (a BOS the server added) is not in the text, so it
    takes no room in the text offsets."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for j, t in enumerate(token_ids):
        text = state.token_text(t)
        entry = entries[j] if entries is not None and j < len(entries) else None
        tokens.append(text)
        offsets.append(offset)
        if not (first_is_hidden and j == 0):
            offset += len(text)
        if (first_is_none and j == 0) or entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(float(entry.get(t, float("-inf"))))
        top_logprobs.append({state.token_text(tid): float(lp) for tid, lp in _top(entry, k)})
    out = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
    return out, offset


def _chat_logprobs(
    state: _State, token_ids: list[int], entries: list[dict[int, float]] | None, k: int
) -> list[dict[str, Any]]:
    content = []
    for j, t in enumerate(token_ids):
        entry = entries[j] if entries is not None and j < len(entries) else None
        text = state.token_text(t)
        lp = float(entry.get(t, float("-inf"))) if entry else float("-inf")
        content.append(
            {
                "token": text,
                "logprob": max(lp, -9999.0),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": state.token_text(tid),
                        "logprob": max(float(v), -9999.0),
                        "bytes": list(state.token_text(tid).encode("utf-8")),
                    }
                    for tid, v in _top(entry, k)
                ],
            }
        )
    return content


def _merge_logprobs(acc: dict[str, list] | None, more: dict[str, list]) -> dict[str, list]:
    if acc is None:
        return more
    for key in acc:
        acc[key].extend(more[key])
    return acc


def _json_safe(obj: Any) -> Any:
    """JSON has no infinities: -inf log-probabilities become -9999.0 (as OpenAI's floor)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else -9999.0
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# The app


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
    state = _State(engine, names, api_key, max_waiting, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.draining = True
        if on_shutdown is not None:
            await _maybe_await(on_shutdown())

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

    app.add_middleware(_RequestMiddleware, state=state)

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
        return await _completions(state, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat_completions(state, body, request)

    return app


# --------------------------------------------------------------------------------------------
# /v1/completions


async def _completions(state: _State, req: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    model = _check_model(state, req.model)
    n = req.n or 1
    if req.suffix:
        raise APIError.bad_request("'suffix' is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != n:
        raise APIError.bad_request("'best_of' must equal 'n' (when given).", param="best_of")
    echo = bool(req.echo)
    max_tokens = req.max_tokens
    if max_tokens == 0 and not echo:
        raise APIError.bad_request(
            "'max_tokens' must be at least 1 (0 is allowed only with 'echo').", param="max_tokens"
        )
    discard = max_tokens == 0  # echo only: the prompt back, nothing generated
    tok = state.engine.tokenizer
    prompts: list[_Prompt] = []
    for p in req.prompts():
        if isinstance(p, str):
            prompts.append(_Prompt(p, tok.encode_prompt(p)))
        else:
            prompts.append(_Prompt(None, list(p)))
    for p in prompts:
        _check_ids(state, p.ids, "prompt")
        _check_context(state, len(p.ids), 1 if discard else max_tokens, "prompt", "max_tokens")
    k = req.logprobs
    params = _sampling_params(
        state,
        req,
        max_tokens=1 if discard else max_tokens,
        logprobs=k,
        prompt_logprobs=k if (echo and k is not None) else None,
        rename={"prompt_logprobs": "logprobs"},
    )
    rid = random_id("cmpl")
    created = int(time.time())
    run = _Run(state, prompts, params, rid, arrival)
    run.start()

    def prompt_text(p: _Prompt) -> str:
        if p.text is not None:
            return p.text
        try:
            return tok.decode(p.ids)
        except Exception:
            return ""

    def prompt_part(p: _Prompt, out: RequestOutput) -> tuple[str, dict[str, list] | None, int]:
        text = prompt_text(p)
        if k is None:
            return text, None, len(text)
        hidden = p.text is not None and p.ids[0] == getattr(tok, "bos_id", None)
        lps, offset = _completion_logprobs(
            state, p.ids, out.prompt_logprobs, k, 0, first_is_none=True, first_is_hidden=hidden
        )
        return text, lps, offset

    if req.stream:
        include_usage = req.wants_usage_in_stream()

        async def stream() -> AsyncIterator[str]:
            seen: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) sent
            offsets: dict[int, int] = {}
            completion_tokens: dict[int, int] = {}
            async for i, out in run.events():
                _raise_if_error(out)
                for o in out.outputs:
                    index = i * n + o.index
                    text, lps = "", None
                    if index not in seen:
                        seen[index] = (0, 0)
                        offsets[index] = 0
                        if echo:
                            text, lps, offsets[index] = prompt_part(prompts[i], out)
                    chars, ntok = seen[index]
                    if not discard:
                        text += o.text[chars:]
                        new_ids = o.token_ids[ntok:]
                        if k is not None and new_ids:
                            more, offsets[index] = _completion_logprobs(
                                state, new_ids, (o.logprobs or [])[ntok:], k, offsets[index]
                            )
                            lps = _merge_logprobs(lps, more)
                        seen[index] = (max(chars, len(o.text)), len(o.token_ids))
                        completion_tokens[index] = len(o.token_ids)
                    finish = o.finish_reason
                    if discard and finish is not None:
                        finish = "length"
                    if not text and finish is None and lps is None:
                        continue
                    if k is not None and lps is None:
                        lps = _completion_logprobs(state, [], None, k, 0)[0]
                    chunk = {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {
                                "index": index,
                                "text": text,
                                "logprobs": lps,
                                "finish_reason": _finish_reason(finish),
                            }
                        ],
                    }
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(_json_safe(chunk))
            if include_usage:
                usage = _usage(sum(len(p.ids) for p in prompts), sum(completion_tokens.values()))
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )

        return _SSEResponse(_guarded_sse(stream(), rid), run)

    finals = await _collect(run, request)
    choices = []
    completion_tokens = 0
    for i, p in enumerate(prompts):
        out = finals[i]
        _raise_if_error(out)
        for o in sorted(out.outputs, key=lambda o: o.index):
            text, lps, offset = ("", None, 0)
            if echo:
                text, lps, offset = prompt_part(p, out)
            finish = o.finish_reason
            if discard:
                finish = "length"
            else:
                text += o.text
                completion_tokens += len(o.token_ids)
                if k is not None:
                    more, _ = _completion_logprobs(state, o.token_ids, o.logprobs, k, offset)
                    lps = _merge_logprobs(lps, more)
            choices.append(
                {
                    "index": i * n + o.index,
                    "text": text,
                    "logprobs": lps,
                    "finish_reason": _finish_reason(finish),
                }
            )
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(sum(len(p.ids) for p in prompts), completion_tokens),
        "system_fingerprint": None,
    }
    return JSONResponse(_json_safe(body))


# --------------------------------------------------------------------------------------------
# /v1/chat/completions


async def _chat_completions(
    state: _State, req: ChatCompletionRequest, request: Request
) -> Response:
    arrival = time.perf_counter()
    model = _check_model(state, req.model)
    if req.tools:
        raise APIError.bad_request("Tool calling is not supported.", param="tools")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise APIError.bad_request(
            f"response_format {fmt!r} is not supported (only 'text').", param="response_format"
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError.bad_request(
            "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs"
        )
    max_tokens, max_param = req.requested_max_tokens()
    if max_tokens == 0:
        raise APIError.bad_request(f"'{max_param}' must be at least 1.", param=max_param)
    messages = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": m.text()})
    try:
        ids = list(await _maybe_await(state.engine.encode_chat(messages)))
    except (ValueError, TypeError, KeyError) as exc:
        raise APIError.bad_request(f"Invalid messages: {exc}", param="messages") from None
    _check_ids(state, ids, "messages")
    _check_context(state, len(ids), max_tokens, "messages", max_param)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling_params(
        state,
        req,
        max_tokens=max_tokens,
        logprobs=k,
        prompt_logprobs=None,
        rename={"max_tokens": max_param, "logprobs": "top_logprobs"},
    )
    rid = random_id("chatcmpl")
    created = int(time.time())
    run = _Run(state, [_Prompt(None, ids)], params, rid, arrival)
    run.start()

    if req.stream:
        include_usage = req.wants_usage_in_stream()

        def chunk(choices: list[dict[str, Any]]) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = None
            return _sse(_json_safe(body))

        async def stream() -> AsyncIterator[str]:
            seen: dict[int, tuple[int, int]] = {}
            completion_tokens: dict[int, int] = {}
            async for _, out in run.events():
                _raise_if_error(out)
                for o in out.outputs:
                    if o.index not in seen:
                        seen[o.index] = (0, 0)
                        yield chunk(
                            [
                                {
                                    "index": o.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    chars, ntok = seen[o.index]
                    text = o.text[chars:]
                    new_ids = o.token_ids[ntok:]
                    seen[o.index] = (max(chars, len(o.text)), len(o.token_ids))
                    completion_tokens[o.index] = len(o.token_ids)
                    lps = None
                    if k is not None and new_ids:
                        lps = {
                            "content": _chat_logprobs(state, new_ids, (o.logprobs or [])[ntok:], k)
                        }
                    if text or lps is not None:
                        yield chunk(
                            [
                                {
                                    "index": o.index,
                                    "delta": {"content": text},
                                    "logprobs": lps,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    if o.finish_reason is not None:
                        yield chunk(
                            [
                                {
                                    "index": o.index,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": _finish_reason(o.finish_reason),
                                }
                            ]
                        )
            if include_usage:
                body = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": _usage(len(ids), sum(completion_tokens.values())),
                }
                yield _sse(body)

        return _SSEResponse(_guarded_sse(stream(), rid), run)

    finals = await _collect(run, request)
    out = finals[0]
    _raise_if_error(out)
    choices = []
    completion_tokens = 0
    for o in sorted(out.outputs, key=lambda o: o.index):
        completion_tokens += len(o.token_ids)
        lps = None
        if k is not None:
            lps = {"content": _chat_logprobs(state, o.token_ids, o.logprobs, k)}
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lps,
                "finish_reason": _finish_reason(o.finish_reason),
            }
        )
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(len(ids), completion_tokens),
        "system_fingerprint": None,
    }
    return JSONResponse(_json_safe(body))


# --------------------------------------------------------------------------------------------
# Auth, draining, metrics and one log line per request (a plain ASGI middleware, so streaming
# and disconnects pass through untouched)


class _RequestMiddleware:
    def __init__(self, app: Any, state: _State) -> None:
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
        except _ClientGone:
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
            if not outcome and scope.get(_OUTCOME):
                outcome = f" {scope[_OUTCOME]}"
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
