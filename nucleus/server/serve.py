"""`nucleus serve`: the OpenAI-compatible server in a process of its own.

    python -m nucleus.server.serve [--model PATH] [--host 127.0.0.1] [--port 8000]
        [--api-key KEY | env NUCLEUS_API_KEY] [--served-model-name NAME]
        [--max-waiting N] [--max-body-bytes N] [--max-sequences-per-request N]
        [--body-timeout S] [--header-timeout S]
        [--device DEV] [--dtype DTYPE] [--max-model-len N] [--max-num-seqs N]
        [--max-num-batched-tokens N] [--stream-interval N] [--tensor-parallel-size N]
        [--engine-in-thread]

The engine runs in a process of its own (`AsyncLLM(engine_process=True)`, docs/engine-process.md),
or with `--engine-in-thread` in a thread of this one. Binds to 127.0.0.1 unless told otherwise and
logs one line per request. SIGTERM (or Ctrl-C) shuts down gracefully: the listening socket closes, new requests on open connections get 503,
in-flight requests run to their end for up to `--shutdown-timeout` seconds and are then aborted
(their streams end with finish_reason "abort" and `data: [DONE]`, their KV blocks are freed), the
engine process (or thread) stops, and the process exits with status 0.

The limits on what one client may ask for (`ServerLimits`) and the scheduling policy that keeps one
request from holding back the others are in docs/server.md and docs/scheduling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import inspect
import logging
import os
import signal
import sys
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nucleus.server.app import build_app
from nucleus.server.limits import ServerLimits

__all__ = ["add_serve_arguments", "build_engine", "main", "run_server"]

logger = logging.getLogger("nucleus.server")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 would silently mean the default)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `nucleus serve`, defined once (the CLI and `python -m` both use them)."""
    parser.add_argument(
        "--model",
        default=None,
        help="model path (a GGUF file, a Hugging Face or Meta checkpoint directory); "
        "default: the built-in SmolLM2-135M-Instruct",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("NUCLEUS_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $NUCLEUS_API_KEY)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients ask for (default: the engine's model name)",
    )
    limits = ServerLimits()
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=limits.max_waiting,
        help="sequences (prompts x n) allowed to wait for the engine, all requests together; "
        f"a request that would go over gets 503 (default {limits.max_waiting})",
    )
    parser.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=limits.max_sequences_per_request,
        help="prompts x n one request may ask for; more get 400 "
        f"(default {limits.max_sequences_per_request})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.max_body_bytes,
        help=f"largest request body; larger ones get 413 (default {limits.max_body_bytes})",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=limits.body_timeout,
        help="seconds a client has to send a whole request body; then 408 "
        f"(default {limits.body_timeout:g})",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=limits.header_timeout,
        help="seconds a connection may stay open without a complete request head "
        f"(default {limits.header_timeout:g})",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run on after SIGTERM before they are aborted",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (default auto: bfloat16 on CUDA, float32 elsewhere)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="a tokenizer file to use instead of the model's own"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=None,
        help="most sequences the engine runs in one batch (default: the engine's)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=None,
        help="the engine's budget of one step (default: 8192 on CUDA, 128 on the CPU; "
        "docs/scheduling.md)",
    )
    parser.add_argument(
        "--stream-interval",
        type=_positive_int,
        default=None,
        help="a stream gets a chunk at its first token, then at most every N engine steps, and "
        "at its end: fewer, larger chunks for many streams (default 1: every step)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=_positive_int,
        default=1,
        help="devices to split the model across (rank r on cuda:r; the engine starts a worker "
        "process per other rank) (default 1)",
    )
    parser.add_argument(
        "--engine-in-thread",
        action="store_true",
        help="run the engine in a thread of the server's process instead of a process of its own "
        "(docs/engine-process.md)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly: no CUDA graphs (slower; for debugging)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    return parser


def build_engine(args: argparse.Namespace) -> Any:
    """The `AsyncLLM` for the flags (the model is loaded here, before the port is bound)."""
    from nucleus.async_llm import AsyncLLM

    kwargs: dict[str, Any] = {}
    names = ("max_model_len", "dtype", "tokenizer", "max_num_seqs", "max_num_batched_tokens",
             "stream_interval")  # fmt: skip
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if getattr(args, "enforce_eager", False):
        kwargs["enforce_eager"] = True
    return AsyncLLM(
        getattr(args, "model", None),
        device=getattr(args, "device", None),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        engine_process=not getattr(args, "engine_in_thread", False),
        **kwargs,
    )


# After the shutdown timeout the requests still in flight are aborted; their streams then end
# cleanly (finish_reason "abort", `data: [DONE]`). uvicorn cancels whatever still runs this many
# seconds later (an engine step in progress must end before an abort takes effect).
_ABORT_GRACE_S = 10.0


def server_limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_sequences_per_request=args.max_sequences_per_request,
        max_waiting=args.max_waiting,
        body_timeout=args.body_timeout,
        header_timeout=args.header_timeout,
    )


class _H11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request head: a connection that has not
    sent a whole request head `header_timeout` seconds after it opened, or after its last response,
    is closed. (uvicorn's keep-alive timer starts again at every byte received, so a client sending
    a byte now and then would hold a connection forever.)"""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request head is in: the app's turn
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn goes on to a pipelined request, which disarms it
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        serving = self.cycle is not None and not self.cycle.response_complete
        if not serving and not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app to turn new requests away as soon as a signal comes, and
    aborting the requests still running when the shutdown timeout is up."""

    def __init__(self, config: uvicorn.Config, app_state: Any, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._app_state = app_state
        self._shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app_state.draining = True
        if not self.should_exit:
            logger.info("received signal %d: shutting down gracefully", sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list | None = None) -> None:
        self._app_state.draining = True
        aborter = asyncio.create_task(self._abort_after(self._shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            aborter.cancel()

    async def _abort_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        n = self._app_state.abort_all()
        if n:
            logger.warning(
                "shutdown timeout (%.0fs) reached: aborting %d request(s) still running", delay, n
            )


async def _shutdown_engine(engine: Any) -> None:
    for name in ("shutdown", "close", "stop"):
        method = getattr(engine, name, None)
        if callable(method):
            try:
                if inspect.iscoroutinefunction(method):
                    await method()
                else:  # AsyncLLM.shutdown joins its engine thread or process: not on the event loop
                    await asyncio.to_thread(method)
            except Exception:
                logger.exception("engine.%s() failed", name)
            return


async def _serve(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    logger.info("loading the model (%s)", args.model or "the built-in default")
    engine = build_engine(args)  # nothing else runs yet; SIGTERM here simply ends the process
    logger.info(
        "model %s loaded in %.1fs (context %d tokens)",
        getattr(engine, "model_name", "?"),
        time.perf_counter() - start,
        engine.max_model_len,
    )
    limits = server_limits(args)
    app = build_app(
        engine, served_model_name=args.served_model_name, api_key=args.api_key, limits=limits
    )
    gc.collect()
    gc.freeze()  # as the engine process does (nucleus.engine_process): lasting objects set aside
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=functools.partial(_H11Protocol, header_timeout=limits.header_timeout),  # type: ignore[arg-type]
        # An idle connection is closed by the head deadline, not by uvicorn's keep-alive timer
        # (default 5 s): httpx and the openai client reuse an idle connection for up to 5 s, and a
        # server closing it at that same moment resets the request sent on it (docs/server.md).
        timeout_keep_alive=limits.header_timeout,
        log_level=args.log_level,
        access_log=False,  # our own middleware logs one line per request
        timeout_graceful_shutdown=args.shutdown_timeout + _ABORT_GRACE_S,
        lifespan="on",
    )
    server = _Server(config, app.state.nucleus, args.shutdown_timeout)
    # uvicorn re-raises the signal it caught once it has shut down, with the handler that was
    # installed before it started: make that one a no-op so a graceful shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        await server.serve()
    finally:
        await _shutdown_engine(engine)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("nucleus")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit status."""
    _setup_logging(getattr(args, "log_level", "info"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    logger.info("server stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nucleus serve", description="OpenAI-compatible server over the nucleus engine."
    )
    add_serve_arguments(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
