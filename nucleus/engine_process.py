"""The engine in a process of its own, for `AsyncLLM(..., engine_process=True)` (`nucleus serve`'s
default): the engine's Python (scheduling, launching steps, detokenizing, building outputs) then
no longer shares one interpreter lock with the server's event loop. docs/engine-process.md has
the design and what it was measured to gain.

The child builds `nucleus.LLM` from the arguments `AsyncLLM` was given (with tensor parallelism it
starts the other ranks itself, as `LLM` does), or calls the builder `AsyncLLM.from_process` was
given, then loops: take the commands that came (wait for
them when idle), apply them, run one step, send one report. Two one-way pipes join the
processes (`multiprocessing.connection`, pickled messages):

- API -> engine: a list of commands per message (`nucleus.engine_driver`), the batch the API's
  sender thread found queued; `("shutdown", None)` last asks the child to abort everything,
  report it and exit.
- engine -> API: `("ready", EngineInfo)` once the model is built (or `("failed", exception)`),
  then one `("step", Report)` per step that had news, `("dead", message)` if the loop dies, and
  `("bye", None)` after a shutdown.

A `RequestOutput` is cumulative (its text, token ids and logprobs grow every step), so a report
carries only what each request gained since its last one (`DeltaEncoder`); the API side rebuilds
the cumulative outputs (`OutputAssembler`). That keeps a step's message proportional to the
step's new tokens, not to everything generated so far.

The child ignores SIGINT and SIGTERM (the API process decides when to stop, and a Ctrl-C reaches
the whole process group) and exits when its command pipe closes: the API process ended, however
it ended.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import multiprocessing as mp
import pickle
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from nucleus.engine_driver import Command, EngineDriver
from nucleus.outputs import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["DeltaEncoder", "EngineInfo", "EngineProcess", "OutputAssembler", "Report"]

logger = logging.getLogger("nucleus.engine_process")

# Reports carry the engine's counters (`EngineDriver.stats`) at most this often, and whenever the
# engine falls idle, so that /metrics and /health are never more than this stale.
STATS_INTERVAL_S = 0.1

# What a request gained in a step: (request_id, finished, completions, new prompt logprobs or
# None, (arrival, first scheduled, first token, finished) times, cached prompt tokens); a
# completion is (new text, new token ids, new logprobs or None, finish_reason, stop_reason,
# error).
Delta = tuple[str, bool, list[tuple], list | None, tuple, int]


@dataclass(frozen=True)
class EngineInfo:
    """What the API process needs of the model built in the child."""

    model_name: str
    max_model_len: int
    vocab_size: int


class Report(NamedTuple):
    """One step's news: the deltas of the requests that changed, the final outputs of the adds
    the engine refused, the sequences of every add applied (refused or queued) per request, and
    the engine's counters (None: unchanged since the last report that had them)."""

    deltas: list[Delta]
    refused: list[RequestOutput]
    added: list[int]
    stats: dict[str, Any] | None


class DeltaEncoder:
    """The child's side: what each request's output gained since it was last reported."""

    def __init__(self) -> None:
        # request id -> per completion [text length, token ids, logprobs] sent; then the
        # prompt logprobs sent.
        self._sent: dict[str, tuple[list[list[int]], list[int]]] = {}

    def encode(self, out: RequestOutput) -> Delta:
        sent = self._sent.get(out.request_id)
        if sent is None:
            sent = self._sent[out.request_id] = ([[0, 0, 0] for _ in out.outputs], [0])
        completions = []
        for c, s in zip(out.outputs, sent[0], strict=True):
            logprobs = None if c.logprobs is None else c.logprobs[s[2] :]
            completions.append(
                (c.text[s[0] :], c.token_ids[s[1] :], logprobs, c.finish_reason, c.stop_reason,
                 c.error)
            )  # fmt: skip
            s[0], s[1], s[2] = len(c.text), len(c.token_ids), len(c.logprobs or ())
        prompt_logprobs = None
        if out.prompt_logprobs is not None:
            prompt_logprobs = out.prompt_logprobs[sent[1][0] :]
            sent[1][0] = len(out.prompt_logprobs)
        if out.finished:
            del self._sent[out.request_id]
        m = out.metrics or RequestMetrics(0.0)
        times = (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time)
        return (
            out.request_id,
            out.finished,
            completions,
            prompt_logprobs,
            times,
            out.num_cached_tokens,
        )


class OutputAssembler:
    """The API's side: one request's cumulative outputs, rebuilt from its deltas. Each output is
    new (lists and strings are not shared with the previous one, as the engine's are not)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.completions: list[CompletionOutput] = []
        self.prompt_logprobs: list | None = None
        self.metrics = RequestMetrics(0.0)

    def apply(self, delta: Delta) -> RequestOutput:
        _, finished, completions, prompt_logprobs, times, cached = delta
        if not self.completions:
            self.completions = [CompletionOutput(index=i) for i in range(len(completions))]
        self.completions = [
            CompletionOutput(
                index=old.index,
                text=old.text + text,
                token_ids=old.token_ids + ids,
                logprobs=None if logprobs is None else (old.logprobs or []) + logprobs,
                finish_reason=reason,
                stop_reason=stop,
                error=error,
            )
            for old, (text, ids, logprobs, reason, stop, error) in zip(
                self.completions, completions, strict=True
            )
        ]
        if prompt_logprobs is not None:
            self.prompt_logprobs = (self.prompt_logprobs or []) + prompt_logprobs
        m = self.metrics  # one object per request, updated in place (as the engine's is)
        m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time = times
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=self.completions,
            finished=finished,
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            metrics=m,
            num_cached_tokens=cached,
        )


class EngineProcess:
    """The API's handle on the child: its pipes and its process."""

    def __init__(self, build: Callable[[], Any]) -> None:
        """Start the child, which runs the engine of the `LLM` that `build()` returns (`build` is
        pickled); `wait_ready` waits for it."""
        context = mp.get_context("spawn")
        theirs_commands, self._commands = context.Pipe(duplex=False)  # (reader, writer)
        self._reports, theirs_reports = context.Pipe(duplex=False)
        level = logging.getLogger("nucleus").getEffectiveLevel()
        # Not a daemon: a daemon may not start processes, and the child starts the
        # tensor-parallel workers. It ends when its command pipe closes (`close`, or atexit).
        self.process = context.Process(
            target=_child_main,
            args=(build, level, theirs_commands, theirs_reports),
            name="nucleus-engine",
            daemon=False,
        )
        self.process.start()
        theirs_commands.close()
        theirs_reports.close()
        atexit.register(self._close_pipes)

    def wait_ready(self) -> EngineInfo:
        """The child's `EngineInfo` once its model is built; raises what building it raised."""
        try:
            kind, body = self._reports.recv()
        except (EOFError, OSError):
            self.close(timeout=5.0)
            raise RuntimeError(
                f"the engine process died while loading the model (exit code "
                f"{self.process.exitcode})"
            ) from None
        if kind != "ready":
            self.close(timeout=5.0)
            raise body
        return body

    def send(self, commands: list[Command]) -> None:
        self._commands.send(commands)

    def receive(self) -> tuple[str, Any]:
        return self._reports.recv()

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def close(self, timeout: float | None = 30.0) -> None:
        """Wait for the child to exit (it has been asked to, or its pipe closes now); after
        `timeout` seconds, end it."""
        self.process.join(timeout)
        self._close_pipes()
        if self.process.is_alive():
            logger.warning("the engine process did not exit in %ss: terminating it", timeout)
            self.process.terminate()
            self.process.join(5.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    def _close_pipes(self) -> None:
        self._commands.close()  # the child sees the end of its commands and exits
        atexit.unregister(self._close_pipes)


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child_main(
    build: Callable[[], Any], log_level: int, commands: Connection, reports: Connection
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("nucleus")
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    root.propagate = False
    try:
        llm = build()
    except BaseException as e:
        with contextlib.suppress(OSError):
            reports.send(("failed", _picklable(e)))
        return
    engine = llm.engine
    # What exists now (the model, the tokenizer's tables, torch's modules) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it, which took
    # milliseconds of the steps it interrupted under load.
    gc.collect()
    gc.freeze()
    try:
        info = EngineInfo(llm.model_name, engine.max_model_len, engine.model.config.vocab_size)
        reports.send(("ready", info))
        _serve(EngineDriver(engine), commands, reports)
    except (EOFError, BrokenPipeError):
        pass  # the API process is gone
    except BaseException as e:
        logger.exception("the engine process died")
        with contextlib.suppress(OSError):
            reports.send(("dead", repr(e)))
    finally:
        engine.shutdown()


def _serve(driver: EngineDriver, commands: Connection, reports: Connection) -> None:
    engine = driver.engine
    encoder = DeltaEncoder()
    stats_time = 0.0
    while True:
        batch: list[Command] = []
        if not engine.has_unfinished():
            batch += commands.recv()  # idle: wait for work
        while commands.poll():
            batch += commands.recv()
        stopping = bool(batch) and batch[-1][0] == "shutdown"
        refused, added = driver.apply(batch[:-1] if stopping else batch)
        outputs: list[RequestOutput] = []
        if stopping:
            outputs = driver.drain()
        elif engine.has_unfinished():
            outputs = driver.step()
        now = time.monotonic()
        fresh = stopping or not engine.has_unfinished() or now - stats_time >= STATS_INTERVAL_S
        if outputs or refused or added or fresh:
            stats = None
            if fresh:
                stats, stats_time = driver.stats(), now
            deltas = [encoder.encode(out) for out in outputs]
            reports.send(("step", Report(deltas, refused, added, stats)))
        if stopping:
            reports.send(("bye", None))
            return
