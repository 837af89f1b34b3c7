"""`nucleus.AsyncLLM`: async streaming generation over the engine, for the server.

The engine is not thread-safe and its steps block, so it lives in one background thread (the
"engine thread") that owns it: `generate` and `abort`, called on the event loop, only queue
commands for that thread, and the thread hands each step's outputs back to the event loop with
`call_soon_threadsafe`. The event loop never runs model code and stays responsive.

Each request streams cumulative `RequestOutput`s (text and token ids so far); the last one has
`finished=True`. A consumer slower than the engine sees only the newest output (intermediate
ones are skipped, never the final one).

Failure handling (one request never takes the others down):
- a request the engine refuses when it is added (prompt too long, token ids out of range, ...)
  ends alone: its stream yields one final output with `finish_reason == "error"` and the message
  in `outputs[i].error`;
- a sequence whose logits go NaN/inf ends the same way (the engine detects it per row);
- an exception raised inside an engine step fails the requests that were running in that step
  (finish_reason "error", the exception's message) and frees their KV blocks; waiting requests are
  kept and the loop goes on serving. If nothing was running, the waiting requests are failed too,
  so that a request that breaks scheduling cannot wedge the loop. The traceback is logged.
- if the engine thread itself dies (a bug outside a step), or the model's tensor-parallel group
  ends (a worker process died or failed: `TensorParallelError`), every open stream ends with an
  error and new requests raise `EngineDeadError`.

`max_waiting` bounds the sequences (`n` per request) queued and not yet running: beyond it
`generate` raises `QueueFull` at once (the server answers 503), and a request of more than
`max_waiting` sequences, which could never be queued, raises ValueError. Text prompts are tokenized
in a worker thread, neither on the event loop nor on the engine thread; one too long to fit the
context is refused before it is tokenized. The scheduler's fairness (docs/scheduling.md) holds
for every caller: a request with a large `n` or a long prompt cannot hold the others back.
`shutdown()` aborts every request (their streams end with finish_reason "abort") and stops the
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nucleus.distributed import TensorParallelError
from nucleus.engine.engine import LLMEngine
from nucleus.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nucleus.sampling_params import SamplingParams
from nucleus.tools import Tool, encode_tool_chat

logger = logging.getLogger("nucleus.async_llm")

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFull"]


class QueueFull(RuntimeError):
    """More sequences would wait than `max_waiting` allows: try again later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or died of an error)."""


@dataclass
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    tokenizing: asyncio.Task | None = None  # a text prompt being tokenized before it is queued


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


def error_output(
    request_id: str, prompt: str | list[int], params: SamplingParams, message: str
) -> RequestOutput:
    """A final output for a request that failed before (or without) producing tokens."""
    text = prompt if isinstance(prompt, str) else None
    ids = [] if isinstance(prompt, str) else list(prompt)
    return RequestOutput(
        request_id=request_id,
        prompt=text,
        prompt_token_ids=ids,
        outputs=[
            CompletionOutput(index=i, finish_reason="error", error=message) for i in range(params.n)
        ],
        finished=True,
        metrics=RequestMetrics(arrival_time=0.0),
    )


class AsyncLLM:
    """Streaming generation with the engine loop in a background thread.

    Build it like `nucleus.LLM` (`AsyncLLM(model, device=..., dtype=..., **engine_options)`), or
    around an existing engine with `AsyncLLM.from_engine`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: str | Path | None = None,
        max_waiting: int | None = None,
        seed: int | None = None,
        num_threads: int | None = None,
        tensor_parallel_size: int = 1,
        exact: bool = False,
        **engine_options: Any,
    ) -> None:
        from nucleus.llm import LLM

        llm = LLM(
            model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            seed=seed,
            num_threads=num_threads,
            tensor_parallel_size=tensor_parallel_size,
            exact=exact,
            **engine_options,
        )
        self._setup(llm.engine, llm.chat_format, llm.model_name, max_waiting)

    @classmethod
    def from_engine(
        cls,
        engine: LLMEngine,
        *,
        chat_format: Any = None,
        model_name: str = "model",
        max_waiting: int | None = None,
    ) -> AsyncLLM:
        self = cls.__new__(cls)
        self._setup(engine, chat_format, model_name, max_waiting)
        return self

    @classmethod
    def from_llm(cls, llm: Any, *, max_waiting: int | None = None) -> AsyncLLM:
        """Serve the engine of an offline `LLM` (which must not be used offline meanwhile)."""
        return cls.from_engine(
            llm.engine,
            chat_format=llm.chat_format,
            model_name=llm.model_name,
            max_waiting=max_waiting,
        )

    def _setup(
        self, engine: LLMEngine, chat_format: Any, model_name: str, max_waiting: int | None
    ) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError("max_waiting must be >= 1 or None")
        self.engine = engine
        self.chat_format = chat_format
        self.model_name = model_name
        self.max_waiting = max_waiting
        self._streams: dict[str, _Stream] = {}
        self._commands: list[tuple[str, Any]] = []
        self._num_pending_adds = 0  # sequences of requests not yet handed to the engine
        self._cv = threading.Condition()
        self._stopping = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self.num_step_errors = 0
        self._thread = threading.Thread(target=self._run, name="nucleus-engine", daemon=True)
        self._thread.start()

    # ---- what the server reads --------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_prompt_chars(self) -> int | None:
        return self.engine.max_prompt_chars

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: Sequence[Tool] | None = None
    ) -> list[int]:
        """Prompt ids of a conversation, with the tools the model may call (`nucleus.tools`)."""
        if self.chat_format is None:
            raise ValueError("this model has no chat format")
        return encode_tool_chat(self.chat_format, messages, tools)

    def stats(self) -> dict[str, Any]:
        """A snapshot (read without stopping the engine thread, so only roughly consistent)."""
        s = self.engine.stats()
        running = {seq.request_id for seq in list(self.engine.scheduler.running)}
        waiting = {seq.request_id for seq in list(self.engine.scheduler.waiting)} - running
        return {
            "running": len(running),
            "waiting": len(waiting) + sum(1 for c in list(self._commands) if c[0] == "add"),
            "waiting_sequences": self._num_waiting(),
            "kv_cache_usage": s["kv_cache_usage"],
            "num_requests": len(self._streams),
            "num_preemptions": s["num_preemptions"],
            "prefix_cache_queries": s["prefix_cache_queries"],
            "prefix_cache_hits": s["prefix_cache_hits"],
            "generation_tokens": s["generation_tokens"],
            "prompt_tokens": s["prompt_tokens"],
            "step_errors": self.num_step_errors,
            "alive": self._thread.is_alive(),
        }

    def _num_waiting(self) -> int:
        """Sequences waiting: in the scheduler's queue, or not yet handed to the engine."""
        return len(self.engine.scheduler.waiting) + self._num_pending_adds

    # ---- requests ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Start a request; returns an async iterator of its cumulative outputs.

        Call it from a coroutine. Raises at once (not at the first iteration) `QueueFull` when
        the request's `n` sequences would take the waiting sequences over `max_waiting`,
        `ValueError` for a request id in use, an `n` over `max_waiting` or a text too long to fit
        the context, and `EngineDeadError` after `shutdown` or if the engine thread died.
        Everything else that goes wrong with the request ends its stream with finish_reason
        "error". Leaving the iteration early (a client gone) aborts the request.
        """
        loop = asyncio.get_running_loop()
        if self._dead is not None or self._stopping or not self._thread.is_alive():
            raise EngineDeadError(
                "the engine is not running"
                + (f": {self._dead!r}" if self._dead is not None else " (shut down)")
            )
        params = params or SamplingParams()
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.max_waiting is not None:
            if params.n > self.max_waiting:
                raise ValueError(
                    f"n={params.n} sequences can never wait in a queue of {self.max_waiting}"
                )
            waiting = self._num_waiting()
            if waiting + params.n > self.max_waiting:
                raise QueueFull(
                    f"{waiting} sequences are waiting, at most {self.max_waiting}: try again later"
                )
        if isinstance(prompt, str):
            self.engine.check_prompt_text(prompt)
        stream = _Stream(request_id, loop)
        self._streams[request_id] = stream
        with self._cv:
            self._num_pending_adds += params.n
        if isinstance(prompt, str):
            stream.tokenizing = loop.create_task(self._tokenize_then_add(stream, prompt, params))
        else:
            self._add(request_id, list(prompt), params)
        return self._iterate(stream)

    def _add(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        ids: list[int] | None = None,
    ) -> None:
        """Hand a request to the engine thread (on the event loop; `ids`: the text's tokens)."""
        with self._cv:
            if not self._stopping:
                self._commands.append(("add", (request_id, prompt, params, ids)))
                self._cv.notify()
                return
            self._num_pending_adds -= params.n
        stream = self._streams.get(request_id)  # shut down while the text was tokenized
        if stream is not None:
            stream.queue.put_nowait(error_output(request_id, prompt, params, "engine shut down"))

    async def _tokenize_then_add(self, stream: _Stream, text: str, params: SamplingParams) -> None:
        try:
            ids = await asyncio.to_thread(self.engine.tokenizer.encode_prompt, text)
        except BaseException as e:  # cancelled (the consumer left) or refused
            with self._cv:
                self._num_pending_adds -= params.n
            if isinstance(e, Exception):
                stream.queue.put_nowait(error_output(stream.request_id, text, params, str(e)))
                return
            raise
        self._add(stream.request_id, text, params, ids)

    async def _iterate(self, stream: _Stream) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out = await stream.queue.get()
                while not out.finished and not stream.queue.empty():
                    out = stream.queue.get_nowait()  # a slow consumer gets the newest output
                if out.finished:
                    stream.finished = True
                yield out
                if out.finished:
                    return
        finally:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
            if not stream.finished:
                if stream.tokenizing is not None:
                    stream.tokenizing.cancel()  # then nothing is queued; else the abort follows it
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends with finish_reason "abort" (no-op if unknown)."""
        with self._cv:
            self._commands.append(("abort", request_id))
            self._cv.notify()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every request (streams end with "abort"), then stop the engine thread (which
        ends the engine's tensor-parallel workers, if any)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step (a
        wake-up is a system call, and a step can have hundreds of outputs)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # the consumer left; its abort is on its way
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed
                for stream, _ in items:
                    self._streams.pop(stream.request_id, None)

    def _apply(self, commands: list[tuple[str, Any]]) -> None:
        engine = self.engine
        for kind, arg in commands:
            if kind == "add":
                request_id, prompt, params, ids = arg
                try:
                    engine.add_request(request_id, prompt, params, prompt_token_ids=ids)
                except Exception as e:  # refused: this request alone ends with the error
                    self._deliver([error_output(request_id, prompt, params, str(e))])
                finally:  # once queued (counted twice a moment, never not at all)
                    with self._cv:
                        self._num_pending_adds -= params.n
            elif kind == "abort":
                engine.abort(arg)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or engine.has_unfinished()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                self._apply(commands)
                if stopping:
                    self._drain()
                    return
                if not engine.has_unfinished():
                    continue
                try:
                    outputs = engine.step()
                except TensorParallelError:
                    raise  # the model is gone: no step can run again
                except Exception as e:
                    self.num_step_errors += 1
                    logger.exception("engine step failed; failing the running requests")
                    outputs = engine.fail_unfinished(f"engine step failed: {e!r}")
                self._deliver(outputs)
        except BaseException as e:  # a bug outside a step: end every stream, refuse new work
            self._dead = e
            logger.exception("the engine thread died")
            for rid, stream in list(self._streams.items()):
                with contextlib.suppress(RuntimeError):
                    stream.loop.call_soon_threadsafe(
                        stream.queue.put_nowait,
                        error_output(rid, [], SamplingParams(), f"engine thread died: {e!r}"),
                    )
            raise
        finally:
            engine.shutdown()

    def _drain(self) -> None:
        """At shutdown: abort everything still known, and report it."""
        engine = self.engine
        with self._cv:
            commands, self._commands = self._commands, []
        self._apply(commands)
        for rid in list(engine.requests):
            engine.abort(rid)
        for _ in range(3):
            if not engine.has_unfinished():
                break
            try:
                self._deliver(engine.step())
            except Exception:
                self._deliver(engine.fail_unfinished("engine shut down", waiting_too=True))
