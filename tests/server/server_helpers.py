"""Helpers: a real `nucleus` server process on a free 127.0.0.1 port, serving the default model.

The process is `python -m nucleus.server.serve` with the real `AsyncLLM` and the default model
(SmolLM2-135M-Instruct); the tests talk to it with the official `openai` client and plain
`httpx`. Only tests/server/test_server_protocol_unit.py uses the FAKE engine (in-process, unit tests of
the protocol and error mapping).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key-123"
MODEL = "smollm2-test"
MAX_WAITING = 128  # sequences the test server lets wait: room for one request of n=128
BODY_TIMEOUT = 3  # seconds the test server gives a client to send a request body
HEADER_TIMEOUT = 3  # ... and a connection to send a request head
SHUTDOWN_TIMEOUT = 8  # seconds in-flight requests may run on after SIGTERM (then aborted)
STARTUP_TIMEOUT = float(os.environ.get("NUCLEUS_TEST_SERVER_STARTUP", "300"))
REPO = Path(__file__).resolve().parents[2]
SERVE_MODULE = "nucleus.server.serve"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str = API_KEY
    model: str = MODEL

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (0 if absent); `labels` as Prometheus writes them, e.g.
        'route="/v1/completions",status="200"'."""
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
        match = re.search(r"^" + pattern + r" ([0-9.eE+-]+|NaN)$", self.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    def server_errors(self) -> list[str]:
        """/metrics lines counting 5xx answers other than 503 (overload, shutdown)."""
        return [
            line
            for line in self.metrics().splitlines()
            if re.search(r'status="5(?!03)', line) and not line.startswith("#")
        ]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*extra: str, api_key: str = API_KEY, model_name: str = MODEL) -> ServerProcess:
    """Starts `python -m nucleus.server.serve` and waits until /health answers."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="nucleus-serve-", suffix=".log")[1])
    cmd = [
        sys.executable,
        "-m",
        SERVE_MODULE,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        model_name,
        *(["--api-key", api_key] if api_key else []),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("NUCLEUS_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, port, log, api_key=api_key, model=model_name)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not come up in {STARTUP_TIMEOUT}s:\n{server.log()[-4000:]}")


def wait_idle(server: ServerProcess, timeout: float = 60) -> tuple[float, float, float]:
    """Waits until nothing runs or waits and the KV cache is empty; returns (KV usage, running,
    waiting) as last read."""
    deadline = time.monotonic() + timeout
    while True:
        state = (
            server.metric("nucleus_kv_cache_usage_ratio"),
            server.metric("nucleus_requests_running"),
            server.metric("nucleus_requests_waiting"),
        )
        if state == (0, 0, 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def hang_up(response: httpx.Response) -> None:
    """Shuts down the connection under a streaming response, from any thread."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Stream(threading.Thread):
    """A streaming request in a thread of its own: `times` holds the arrival of each event (each
    `data:` line but `[DONE]`); `first` is set at the first; `close()` hangs up."""

    def __init__(self, server: ServerProcess, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = server.base_url + path, server.headers
        self.body = {"model": server.model, "stream": True, **body}
        self.times: list[float] = []
        self.lines: list[str] = []
        self.first = threading.Event()
        self.sent_at = 0.0
        self.status: int | None = None
        self._response: httpx.Response | None = None
        self._closing = False

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent_at

    def gaps_after(self, since: float) -> list[float]:
        """The gaps between successive events of those that came after `since`."""
        times = [t for t in self.times if t >= since]
        return [b - a for a, b in itertools.pairwise(times)]

    def run(self) -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=300) as client:
            self.sent_at = time.monotonic()
            with client.stream("POST", self.url, json=self.body, headers=self.headers) as r:
                self._response, self.status = r, r.status_code
                for line in r.iter_lines():
                    if self._closing:
                        return
                    if line.startswith("data: ") and line != "data: [DONE]":
                        self.times.append(time.monotonic())
                        self.lines.append(line)
                        self.first.set()

    def close(self) -> None:
        """Hangs up: shuts the socket down (closing the response from this thread would not wake
        the reader blocked on it while the server sends nothing)."""
        self._closing = True
        if self._response is not None:
            hang_up(self._response)
        self.join(30)
