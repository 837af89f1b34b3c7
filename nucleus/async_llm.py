"""`nucleus.AsyncLLM`: async streaming generation over the engine, for the server.

The engine is not thread-safe and its steps block, so it lives in one background thread (the
"engine thread") that owns it: `generate` and `abort`, called on the event loop, only queue
commands for that thread, and the thread hands each step's outputs back to the event loop with
`call_soon_threadsafe`. The event loop never runs model code and stays responsive.

With `engine_process=True` the engine runs in a child process instead (`nucleus.engine_process`,
docs/engine-process.md), so that its Python and the event loop's do not share one interpreter
lock: a sender thread hands the queued commands to the child in one message per batch, and a
receiver thread turns each of the child's step reports into the streams' outputs. This process
keeps the tokenizer (prompts and chat templates are encoded here) and the model's name and
context length. Everything below holds in both modes; "the engine thread" then means the child.

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
- if the engine thread itself dies (a bug outside a step), the engine process exits or is killed,
  or the model's tensor-parallel group ends (a worker process died or failed:
  `TensorParallelError`), every open stream ends with an error and new requests raise
  `EngineDeadError`.

`max_waiting` bounds the sequences (`n` per request) queued and not yet running: beyond it
`generate` raises `QueueFull` at once (the server answers 503), and a request of more than
`max_waiting` sequences, which could never be queued, raises ValueError. Text prompts are tokenized
in a worker thread, neither on the event loop nor on the engine thread; one too long to fit the
context is refused before it is tokenized. The scheduler's fairness (docs/scheduling.md) holds
for every caller: a request with a large `n` or a long prompt cannot hold the others back.
`shutdown()` aborts every request (their streams end with finish_reason "abort") and stops the
thread (or the process).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nucleus.engine.engine import LLMEngine, check_prompt_text, max_prompt_chars
from nucleus.engine_driver import Command, EngineDriver, error_output
from nucleus.engine_process import EngineProcess, OutputAssembler, Report
from nucleus.outputs import RequestOutput
from nucleus.sampling_params import SamplingParams
from nucleus.tools import Tool, encode_tool_chat

logger = logging.getLogger("nucleus.async_llm")

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFull"]


class QueueFull(RuntimeError):
    """More sequences would wait than `max_waiting` allows: try again later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread or process has stopped (shut down, or died of an error)."""


@dataclass
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    tokenizing: asyncio.Task | None = None  # a text prompt being tokenized before it is queued
    assembler: OutputAssembler | None = None  # engine process: rebuilds the outputs


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


class AsyncLLM:
    """Streaming generation with the engine loop in a background thread, or in a process of its
    own with `engine_process=True`.

    Build it like `nucleus.LLM` (`AsyncLLM(model, device=..., dtype=..., **engine_options)`), or
    around an existing engine with `AsyncLLM.from_engine` (always in a thread).
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
        engine_process: bool = False,
        **engine_options: Any,
    ) -> None:
        llm_kwargs = dict(
            model=model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            seed=seed,
            num_threads=num_threads,
            tensor_parallel_size=tensor_parallel_size,
            exact=exact,
            **engine_options,
        )
        from nucleus.llm import LLM

        if engine_process:
            from nucleus.loaders import load_model_files

            process = EngineProcess(functools.partial(LLM, **llm_kwargs))
            try:  # the tokenizer is read here while the child loads the model
                files = load_model_files(model, tokenizer_path=tokenizer, weights=False)
            except BaseException:
                process.close(timeout=5.0)
                raise
            self._attach(process, files.tokenizer, files.chat, max_waiting)
            return
        llm = LLM(**llm_kwargs)
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
    def from_process(
        cls,
        build: Callable[[], Any],
        *,
        tokenizer: Any,
        chat_format: Any = None,
        max_waiting: int | None = None,
    ) -> AsyncLLM:
        """The engine of the `LLM` that `build()` returns, built and run in a process of its own
        (`build` is pickled: a module-level function or a `functools.partial` of one).
        `tokenizer` encodes prompts here; it must be the model's."""
        self = cls.__new__(cls)
        self._attach(EngineProcess(build), tokenizer, chat_format, max_waiting)
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

    def _init_state(self, chat_format: Any, model_name: str, max_waiting: int | None) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError("max_waiting must be >= 1 or None")
        self.chat_format = chat_format
        self.model_name = model_name
        self.max_waiting = max_waiting
        self._streams: dict[str, _Stream] = {}
        self._commands: list[Command] = []
        # Requests and sequences (`n` per request) not yet in the engine's queue: tokenizing,
        # queued as commands, or (engine process) on their way to the child.
        self._num_pending_requests = 0
        self._num_pending_adds = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()

    def _setup(
        self, engine: LLMEngine, chat_format: Any, model_name: str, max_waiting: int | None
    ) -> None:
        self._init_state(chat_format, model_name, max_waiting)
        self.engine: LLMEngine | None = engine
        self._driver = EngineDriver(engine)
        self._process: EngineProcess | None = None
        self._tokenizer = engine.tokenizer
        self._max_model_len = engine.max_model_len
        self._vocab_size = engine.model.config.vocab_size
        self._thread = threading.Thread(target=self._run, name="nucleus-engine", daemon=True)
        self._threads = [self._thread]
        self._thread.start()

    def _attach(
        self, process: EngineProcess, tokenizer: Any, chat_format: Any, max_waiting: int | None
    ) -> None:
        try:
            info = process.wait_ready()
            self._init_state(chat_format, info.model_name, max_waiting)
        except BaseException:
            process.close(timeout=5.0)
            raise
        self.engine = None
        self._process = process
        self._tokenizer = tokenizer
        self._max_model_len = info.max_model_len
        self._vocab_size = info.vocab_size
        self._stats: dict[str, Any] = {}  # the child's last counters
        self._thread = threading.Thread(
            target=self._receive_loop, name="nucleus-engine-receiver", daemon=True
        )
        sender = threading.Thread(target=self._send_loop, name="nucleus-engine-sender", daemon=True)
        self._threads = [self._thread, sender]
        for thread in self._threads:
            thread.start()

    # ---- what the server reads --------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (token ids a prompt may hold are below it)."""
        return self._vocab_size

    @property
    def max_prompt_chars(self) -> int | None:
        return max_prompt_chars(self._tokenizer, self._max_model_len)

    @property
    def in_process(self) -> bool:
        """Whether the engine runs in a process of its own."""
        return self._process is not None

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self._dead is None

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: Sequence[Tool] | None = None
    ) -> list[int]:
        """Prompt ids of a conversation, with the tools the model may call (`nucleus.tools`)."""
        if self.chat_format is None:
            raise ValueError("this model has no chat format")
        return encode_tool_chat(self.chat_format, messages, tools)

    def stats(self) -> dict[str, Any]:
        """A snapshot (read without stopping the engine, so only roughly consistent; from the
        engine process, at most `engine_process.STATS_INTERVAL_S` old)."""
        with self._cv:
            s = self._driver.stats() if self._process is None else dict(self._stats)
            s["waiting"] = s.get("waiting", 0) + self._num_pending_requests
            s["waiting_sequences"] = s.get("waiting_sequences", 0) + self._num_pending_adds
        s["num_requests"] = len(self._streams)
        s["alive"] = self._thread.is_alive() and self._dead is None
        return s

    def _num_waiting(self) -> int:
        """Sequences waiting: in the scheduler's queue, or not yet handed to the engine."""
        if self._process is None:
            return len(self._driver.engine.scheduler.waiting) + self._num_pending_adds
        with self._cv:
            return self._stats.get("waiting_sequences", 0) + self._num_pending_adds

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
        the context, and `EngineDeadError` after `shutdown` or if the engine died.
        Everything else that goes wrong with the request ends its stream with finish_reason
        "error". Leaving the iteration early (a client gone) aborts the request.
        """
        loop = asyncio.get_running_loop()
        if not self.is_running:
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
            check_prompt_text(prompt, self.max_prompt_chars, self._max_model_len)
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
        """Hand a request to the engine (on the event loop; `ids`: the text's tokens)."""
        stream = self._streams.get(request_id)
        if stream is not None and self._process is not None:
            text = prompt if isinstance(prompt, str) else None
            stream.assembler = OutputAssembler(request_id, text, list(ids or prompt))
        with self._cv:
            if not self._stopping and self._dead is None:
                self._commands.append(("add", (request_id, prompt, params, ids)))
                self._num_pending_requests += 1
                self._cv.notify()
                return
            self._num_pending_adds -= params.n
        if stream is not None:  # shut down (or dead) while the text was tokenized
            stream.queue.put_nowait(error_output(request_id, prompt, params, "engine shut down"))

    async def _tokenize_then_add(self, stream: _Stream, text: str, params: SamplingParams) -> None:
        try:
            ids = await asyncio.to_thread(self._tokenizer.encode_prompt, text)
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
            if self._dead is None:
                self._commands.append(("abort", request_id))
                self._cv.notify()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every request (streams end with "abort"), then stop the engine thread or
        process (which ends the engine's tensor-parallel workers, if any)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if threading.current_thread() in self._threads:
            return
        for thread in self._threads:
            thread.join(timeout)
        if self._process is not None:
            self._process.close(timeout)

    # ---- delivering outputs (on the engine thread or the receiver thread) ---------------------
    def _post(self, items: list[tuple[_Stream, RequestOutput]]) -> None:
        """Hand outputs to their streams: one wake-up of each event loop per step (a wake-up is
        a system call, and a step can have hundreds of outputs)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for stream, out in items:
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, group)
            except RuntimeError:  # the event loop is closed
                for stream, _ in group:
                    self._streams.pop(stream.request_id, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        items = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:  # else the consumer left; its abort is on its way
                items.append((stream, out))
        self._post(items)

    def _taken(self, added: list[int]) -> None:
        """The engine has taken these adds (`n` each) into its queue, or refused them."""
        with self._cv:
            self._num_pending_requests -= len(added)
            self._num_pending_adds -= sum(added)

    def _die(self, e: BaseException) -> None:
        """The engine is gone: end every stream with the error, refuse new work."""
        with self._cv:
            self._dead = e
            self._cv.notify_all()
        items = [
            (stream, error_output(rid, [], SamplingParams(), str(e)))
            for rid, stream in list(self._streams.items())
        ]
        self._post(items)

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        driver = self._driver
        engine = driver.engine
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or engine.has_unfinished()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                refused, added = driver.apply(commands)
                self._taken(added)  # once queued (counted twice a moment, never not at all)
                self._deliver(refused)
                if stopping:
                    self._deliver(driver.drain())
                    return
                if engine.has_unfinished():
                    self._deliver(driver.step())
        except BaseException as e:  # a bug outside a step: end every stream, refuse new work
            logger.exception("the engine thread died")
            self._die(EngineDeadError(f"engine thread died: {e!r}"))
            raise
        finally:
            engine.shutdown()

    # ---- the engine process's two threads ---------------------------------------------------
    def _send_loop(self) -> None:
        """Hand the queued commands to the child, a batch per message; at shutdown, ask it to
        drain and exit."""
        assert self._process is not None
        while True:
            with self._cv:
                while not (self._commands or self._stopping or self._dead is not None):
                    self._cv.wait()
                if self._dead is not None:
                    return
                commands, self._commands = self._commands, []
                stopping = self._stopping
            if stopping:
                commands.append(("shutdown", None))
            try:
                self._process.send(commands)
            except OSError:
                return  # the child is gone: the receiver reports it
            if stopping:
                return

    def _receive_loop(self) -> None:
        """Turn the child's reports into the streams' outputs, until it says goodbye or dies."""
        assert self._process is not None
        try:
            while True:
                kind, body = self._process.receive()
                if kind == "bye":
                    return
                if kind == "dead":
                    raise EngineDeadError(f"the engine process died: {body}")
                self._on_report(body)
        except (EOFError, OSError):
            self._process.process.join(5.0)
            code = self._process.exitcode
            logger.error("the engine process exited unexpectedly (exit code %s)", code)
            self._die(EngineDeadError(f"the engine process exited (exit code {code})"))
        except BaseException as e:
            logger.error("%s", e)
            self._die(e if isinstance(e, EngineDeadError) else EngineDeadError(repr(e)))

    def _on_report(self, report: Report) -> None:
        items = []
        for delta in report.deltas:
            stream = self._streams.get(delta[0])
            if stream is not None and stream.assembler is not None:
                items.append((stream, stream.assembler.apply(delta)))
        with self._cv:  # the queue the child saw and what it took from ours, at once
            if report.stats is not None:
                self._stats = report.stats
            self._num_pending_requests -= len(report.added)
            self._num_pending_adds -= sum(report.added)
        self._post(items)
        self._deliver(report.refused)
