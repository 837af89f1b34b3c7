"""Running one HTTP request on the engine: its engine requests (one per prompt) merged into one
stream of outputs, admission against the waiting-queue bound, aborts when the client goes away,
and the engine's refusals turned into OpenAI errors."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from nucleus.async_llm import EngineDeadError, QueueFull
from nucleus.outputs import RequestOutput
from nucleus.sampling_params import SamplingParams
from nucleus.server.inputs import value_error
from nucleus.server.metrics import engine_stat
from nucleus.server.protocol import APIError
from nucleus.server.state import ServerState, maybe_await

__all__ = ["ClientGone", "Prompt", "Run", "collect", "raise_if_error"]

logger = logging.getLogger("nucleus.server")


_Item = tuple[int, RequestOutput | None, Exception | None]  # (prompt index, output, error)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nothing is sent."""


@dataclass
class Prompt:
    text: str | None  # as the client sent it, when it sent text
    ids: list[int]


class Run:
    """One HTTP request's engine requests (one per prompt), merged into one stream of outputs.

    Admission (the waiting-queue bound, in sequences: prompts x n) happens in the constructor,
    so a full queue is a 503 before anything is streamed. `close()` aborts whatever has not
    finished (and counts it in the metrics as finished by "abort"); it is idempotent.
    """

    def __init__(
        self,
        state: ServerState,
        prompts: list[Prompt],
        params: SamplingParams,
        base_id: str,
        arrival: float,
    ) -> None:
        waiting = max(state.pending, int(engine_stat(state.engine_stats(), "waiting_sequences")))
        limits = state.limits
        if waiting + len(prompts) * params.n > limits.max_waiting:
            state.metrics.rejected.labels("queue_full").inc()
            raise APIError.overloaded(
                f"The server is overloaded: {waiting} sequence(s) are waiting (at most "
                f"{limits.max_waiting}). Please retry later.",
                limits.retry_after,
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
        state.pending += len(prompts) * params.n
        state.runs.add(self)
        state.metrics.prompt_tokens.inc(sum(len(p.ids) for p in prompts))

    def start(self) -> None:
        """Starts the engine requests of a run of several prompts, each pumped by a task into
        one queue. A run of one prompt has none: `events` reads its stream itself, which spares
        each output a task switch and a second queue (and a stream that falls behind gets the
        newest output, as `AsyncLLM` coalesces them)."""
        if len(self.prompts) > 1 and not self._tasks:
            self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.prompts))]

    async def _outputs(self, i: int) -> AsyncIterator[_Item]:
        """Prompt `i`'s outputs as (i, output, None), then (i, None, None) when its stream ends,
        or (i, None, exception) if the engine refused it or failed."""
        try:
            stream = await maybe_await(
                self.state.engine.generate(self.prompts[i].ids, self.params, self.request_ids[i])
            )
        except Exception as exc:
            yield i, None, exc
            return
        try:
            async for out in stream:
                yield i, out, None
        except Exception as exc:
            yield i, None, exc
            return
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        yield i, None, None

    async def _pump(self, i: int) -> None:
        async with contextlib.aclosing(self._outputs(i)) as items:
            async for item in items:
                self._queue.put_nowait(item)

    async def _merged(self) -> AsyncIterator[_Item]:
        self.start()
        while True:
            yield await self._queue.get()

    def _started(self, i: int) -> None:
        if i in self._not_started:
            self._not_started.discard(i)
            self.state.pending -= self.params.n

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
        remaining = len(self.prompts)
        items = self._outputs(0) if remaining == 1 else self._merged()
        try:
            async with contextlib.aclosing(items):
                async for i, out, exc in items:
                    self._started(i)
                    if exc is not None:
                        self._finished.add(i)  # refused by the engine: nothing to abort
                        raise _engine_error(exc, self.state.limits.retry_after)
                    if out is None:
                        remaining -= 1
                        self._finished.add(i)  # the engine's stream ended: nothing to abort
                        if not remaining:
                            return
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
        aborted = self.state.metrics.finished.labels("abort")
        for i in range(len(self.prompts)):
            if i not in self._finished:
                aborted.inc(sum((i, j) not in self._done for j in range(self.params.n)))
        waits = self.abort()
        for task in self._tasks:
            task.cancel()
        waits += self._tasks
        if waits:
            await asyncio.shield(asyncio.gather(*waits, return_exceptions=True))


def _engine_error(exc: Exception, retry_after: int) -> Exception:
    """The engine refused a request: its ValueErrors are the client's mistakes (400); a full
    queue or a stopped engine is a 503."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError.overloaded(
            f"The server is overloaded: {exc}. Please retry later.", retry_after
        )
    if isinstance(exc, EngineDeadError):
        return APIError.unavailable(
            f"The engine is not running: {exc}", "engine_unavailable", retry_after
        )
    if isinstance(exc, ValueError):
        return value_error(exc)
    return exc


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a stray body message: look again a moment later


async def collect(run: Run, request: Request) -> dict[int, RequestOutput]:
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
        raise ClientGone()
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
        await run.close()


def raise_if_error(out: RequestOutput) -> None:
    for o in out.outputs:
        if o.finish_reason == "error":
            raise APIError(500, f"The engine failed on this request: {o.error or 'unknown'}")
