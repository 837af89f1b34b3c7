"""What the benchmark scripts share: the machine's name, a `nucleus serve` process to measure, and
their sections of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


def cpu_name() -> str:
    """The processor's name as `lscpu` gives it (platform's guess where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def start_server(
    flags: list[str],
    *,
    checkout: Path = REPO,
    prefix: str = "nucleus-bench-",
    entry: tuple[str, ...] = ("-m", "nucleus.server.serve"),
) -> tuple[subprocess.Popen, str, Path]:
    """`python -m nucleus.server.serve` (or `python *entry`, which takes the same flags) on a
    free port with the code of `checkout`; returns the process, its URL and its log once /health
    answers (exits the script if it never does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix=prefix, suffix=".log")[1])
    cmd = [sys.executable, *entry, "--port", str(port), *flags]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")])),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=checkout, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    sys.exit("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: a graceful shutdown
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def update_docs_section(begin: str, end: str, section: str) -> None:
    """Puts `section` (which starts with `begin` and ends with `end`) in docs/benchmarks.md in
    place of the one there, or at its end."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"  # re-read right before
    if begin in text and end in text:
        text = re.sub(
            re.escape(begin) + ".*?" + re.escape(end) + "\n?", lambda _: section, text, flags=re.S
        )
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text)


def mixed_requests(n: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """`n` requests of random token ids, prompts of 32-1,024 tokens and outputs of 32-512 tokens
    (uniform), drawn from `rng`: the mixed workload of `bench/gpu.py` and `bench/serve.py --mix`."""
    lens = [(rng.randint(32, 1024), rng.randint(32, 512)) for _ in range(n)]
    prompts = [[rng.randrange(0, 128000) for _ in range(p)] for p, _ in lens]
    return prompts, [o for _, o in lens]
