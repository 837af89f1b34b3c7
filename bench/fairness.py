"""Head-of-line probes: can one client's request stall, starve or exhaust a `nucleus serve`?

    python bench/fairness.py                         # a server of this tree, the default model
    python bench/fairness.py --peer /work/main       # the same probes on another checkout, after
    python bench/fairness.py --update-docs           # also rewrite its section of docs/benchmarks.md

The probes of issue 14, each against a server started here (`python -m nucleus.server.serve`):
- body: a body of `--body-mb` MB (200; `Content-Length` given): status and seconds to the answer,
  and the slowest `/health` answer meanwhile (polled every 20 ms);
- prompt: a 3 MB text prompt, under the body limit, far over the context: the same figures;
- n=128: a streaming `n=128, max_tokens=2000` completion runs; another client's 16-token chat
  request: seconds to its first token;
- prefill: two streams decode (one event per token), then a 7,000-token prompt arrives; 2 s later
  a 1-token request: seconds to its first token, and the longest gap between two tokens of the
  running streams from the long prompt's arrival to 2 s after that first token.
A probe waits at most `--cap` seconds for an answer ("> cap" in the table). `--peer DIR` runs the
probes again on a server started from the checkout DIR (its code, this Python), one after the
other, never at once. Prints a table and writes JSON (default bench/results/fairness.json).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from common import REPO, cpu_name, start_server, stop_server, update_docs_section

BEGIN, END = "<!-- bench/fairness.py:begin -->", "<!-- bench/fairness.py:end -->"


_POLL_HEALTH = """
import sys, time, httpx
with httpx.Client(timeout=600) as client:
    while True:
        start = time.monotonic()
        try:
            client.get(sys.argv[1])
        except httpx.HTTPError:
            pass
        print(time.monotonic() - start, flush=True)
        time.sleep(0.02)
"""


class _Health:
    """The slowest /health answer while the block runs, polled every 20 ms from a process of its
    own (this one is busy sending)."""

    def __init__(self, url: str) -> None:
        self.url, self.worst = f"{url}/health", 0.0

    def __enter__(self) -> _Health:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _POLL_HEALTH, self.url], stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=60)
        self.worst = max((float(x) for x in out.split()), default=0.0)


class _Stream(threading.Thread):
    """A streaming request: the arrival time of each event; `close()` hangs up."""

    def __init__(self, url: str, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url + path, {"stream": True, **body}
        self.times: list[float] = []
        self.first = threading.Event()
        self.sent_at = 0.0
        self._response: httpx.Response | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=600) as client:
                self.sent_at = time.monotonic()
                with client.stream("POST", self.url, json=self.body) as r:
                    self._response = r
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            self.times.append(time.monotonic())
                            self.first.set()
        except Exception:
            pass

    def close(self) -> None:
        """Hangs up: shuts the socket down, which wakes the reader even while nothing comes."""
        if self._response is not None:
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.join(60)


def _refusal(url: str, content: bytes, cap: float) -> dict:
    with _Health(url) as health:
        start = time.monotonic()
        try:
            r = httpx.post(
                f"{url}/v1/completions",
                content=content,
                headers={"content-type": "application/json"},
                timeout=cap,
            )
            status, seconds = r.status_code, time.monotonic() - start
        except httpx.HTTPError as e:
            status, seconds = type(e).__name__, None
    return {"status": status, "seconds": seconds, "health_worst_s": health.worst}


def _big_n(url: str, cap: float) -> dict:
    body = {"prompt": "Once upon a time", "n": 128, "max_tokens": 2000, "ignore_eos": True}
    big = _Stream(url, "/v1/completions", body)
    big.start()
    big.first.wait(cap)
    time.sleep(1.0)
    chat = _Stream(
        url,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Say hello to me."}], "max_tokens": 4},
    )
    chat.start()
    got = chat.first.wait(cap)
    chat.close()
    big.close()
    return {"ttft_s": chat.times[0] - chat.sent_at if got else None}


def _long_prefill(url: str, cap: float) -> dict:
    running = [
        _Stream(
            url,
            "/v1/completions",
            {"prompt": f"Story {i}:", "max_tokens": 2000, "ignore_eos": True, "logprobs": 0},
        )
        for i in range(2)
    ]
    for s in running:
        s.start()
    for s in running:
        s.first.wait(cap)
    rng = random.Random(14)
    ids = [rng.randrange(1000, 40000) for _ in range(7000)]
    long = _Stream(url, "/v1/completions", {"prompt": ids, "max_tokens": 1})
    long.start()
    time.sleep(2.0)
    new = _Stream(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 1})
    new.start()
    got = new.first.wait(cap)
    time.sleep(2.0)
    gaps = []
    for s in running:
        times = [t for t in s.times if t >= long.sent_at] + [time.monotonic()]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    for s in (*running, long, new):
        s.close()
    return {
        "ttft_s": new.times[0] - new.sent_at if got else None,
        "max_gap_s": max(gaps),
        "long_prompt_done": long.first.is_set(),
    }


def run_probes(checkout: Path, server_args: list[str], cap: float, body_mb: int) -> dict:
    results = {}
    for name, probe in (
        ("body", lambda url: _refusal(url, b'{"prompt": "' + b"x" * (body_mb << 20) + b'"}', cap)),
        (
            "prompt",
            lambda url: _refusal(url, json.dumps({"prompt": "hi " * 1_000_000}).encode(), cap),
        ),
        ("n=128", lambda url: _big_n(url, cap)),
        ("prefill", lambda url: _long_prefill(url, cap)),
    ):
        print(f"{checkout}: {name} ...", file=sys.stderr, flush=True)
        # a fresh server each: no probe inherits another's load
        proc, url, _ = start_server(server_args, checkout=checkout, prefix="nucleus-fairness-")
        try:
            results[name] = probe(url)
            results[name]["load_avg"] = os.getloadavg()[0]
        finally:
            stop_server(proc)
    return results


def _s(value: float | None, cap: float) -> str:
    return f"> {cap:.0f} s" if value is None else f"{value:.2f} s"


def table(runs: dict[str, dict], cap: float, body_mb: int) -> str:
    names = list(runs)
    rows = ["| probe | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for probe, label in (("body", f"{body_mb} MB body"), ("prompt", "3 MB prompt")):
        rows.append(
            f"| {label}: answer | "
            + " | ".join(
                f"{r[probe]['status']} in {_s(r[probe]['seconds'], cap)}" for r in runs.values()
            )
            + " |"
        )
        rows.append(
            f"| {label}: slowest /health meanwhile | "
            + " | ".join(f"{r[probe]['health_worst_s']:.3f} s" for r in runs.values())
            + " |"
        )
    rows.append(
        "| beside n=128, max_tokens=2000: first token of a chat request | "
        + " | ".join(_s(r["n=128"]["ttft_s"], cap) for r in runs.values())
        + " |"
    )
    rows.append(
        "| beside a 7,000-token prefill: first token of a new request | "
        + " | ".join(_s(r["prefill"]["ttft_s"], cap) for r in runs.values())
        + " |"
    )
    rows.append(
        "| beside a 7,000-token prefill: longest gap between tokens of running streams | "
        + " | ".join(f"{r['prefill']['max_gap_s']:.2f} s" for r in runs.values())
        + " |"
    )
    rows.append(
        "| load average (1 min) during the probes | "
        + " | ".join(
            "/".join(f"{r[p]['load_avg']:.1f}" for p in ("body", "prompt", "n=128", "prefill"))
            for r in runs.values()
        )
        + " |"
    )
    return "\n".join(rows)


def _update_docs(text_table: str, meta: dict) -> None:
    section = (
        f"{BEGIN}\n## Head-of-line probes: one client against the others (`bench/fairness.py`)\n\n"
        f"- command: `{meta['command']}`\n- device: {meta['machine']}; Python {meta['python']}\n"
        f"- date: {meta['date']}\n\n"
        "Each probe runs on a fresh `nucleus serve` with the default model and flags; a column is "
        "a checkout. See the script's docstring for the probes; the bounds issue 14 asks for are "
        "413/400 within 1 s with /health under 100 ms, a first token within 2 s beside n=128 and "
        "within 3 s beside a 7,000-token prefill, and no gap over 1 s in running streams. The "
        "machine is shared: the load average says how busy it was.\n\n"
        f"{text_table}\n{END}\n"
    )
    update_docs_section(BEGIN, END, section)


def _commit(checkout: Path) -> str:
    """The checkout's commit, with "+" when its tracked files differ from it."""
    git = ["git", "-C", str(checkout)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode
    except OSError:
        return "?"
    return head.stdout.strip() + ("+" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, help="also probe a server from this checkout")
    p.add_argument("--cap", type=float, default=60.0, help="seconds a probe waits at most")
    p.add_argument("--body-mb", type=int, default=200, help="size of the oversized body")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the servers")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "fairness.json"))
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)
    runs = {
        f"this tree ({_commit(REPO)})": run_probes(REPO, args.server_arg, args.cap, args.body_mb)
    }
    if args.peer:
        peer = run_probes(args.peer.resolve(), args.server_arg, args.cap, args.body_mb)
        runs[f"peer {args.peer} ({_commit(args.peer)})"] = peer
    text_table = table(runs, args.cap, args.body_mb)
    print(text_table)
    meta = {
        "command": "python bench/fairness.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_name()} CPU, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    if args.update_docs:
        _update_docs(text_table, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
