"""Serving benchmark: time to first token, inter-token latency and requests per second of a
`nucleus serve` process under concurrent streaming load.

    python bench/serve.py                           # starts a server with the default model
    python bench/serve.py --concurrency 1,4,16 --requests 32 --max-tokens 32
    python bench/serve.py --url http://127.0.0.1:8000 --api-key KEY   # an already running one
    python bench/serve.py --update-docs             # also rewrite its section of docs/benchmarks.md
    python bench/serve.py --model DIR --mix 512 --concurrency 64,256 --offline   # mixed lengths
    python bench/serve.py ... --profile prof.txt    # py-spy over the server at the largest level

Each level of concurrency runs `--requests` streaming completions (fixed length: `ignore_eos`,
`max_tokens`) from that many clients at once. Time to first token (TTFT) is from sending the
request to the first chunk with text; inter-token latency (ITL) is the gap between successive
chunks of a stream (the server sends one chunk per engine step, so one token per chunk);
TPOT is a request's (end - first token) / (tokens - 1). `--mix N`: N requests of random
Llama 3 token ids with mixed prompt and output lengths instead (bench/gpu.py's mix). `--offline`:
then the largest level's requests through the offline `LLM`, the figure the server is compared
with. `--profile FILE`: py-spy's flat stacks of the server and its engine process during the
largest level (`bench/pyspy_summary.py FILE` summarizes them). Prints a table and writes JSON
(default bench/results/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from common import (
    DOCS,
    REPO,
    cpu_name,
    mixed_requests,
    start_server,
    stop_server,
    update_docs_section,
)

BEGIN, END = "<!-- bench/serve.py:begin -->", "<!-- bench/serve.py:end -->"
PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue to a child.",
    "List some good habits for programmers.",
    "Describe the city of Paris in spring.",
]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    chunks: int = 0  # events with text (a stream that falls behind gets several tokens in one)
    gaps: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    client_processes: int = 1
    # CPU seconds per second of the level: the busiest client process (near 1: the clients may be
    # the limit), and the server process (all its threads; None: a server not started here).
    client_cpu_per_process: float = 0.0
    server_cpu: float | None = None
    text_chunks: int = 0


PROFILE_DELAY_S = 3
PROFILE_S = 6


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    xs = sorted(values)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] * 1000

    return {
        "mean": statistics.fmean(xs) * 1000,
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
    }


async def _one(
    client: httpx.AsyncClient, model: str, prompt: str | list[int], max_tokens: int,
    temperature: float,
):  # fmt: skip
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return RequestResult(
                    False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                )
            async for line in _sse_lines(r):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"]))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return RequestResult(False, error=repr(exc))
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no text")
    return RequestResult(
        True, ttft=first - start, e2e=end - start, tokens=tokens, chunks=chunks, gaps=gaps
    )


async def _sse_lines(response: httpx.Response):
    """The lines of an event stream, which ends lines with LF (or CR LF) only: httpx's
    `aiter_lines` also splits on U+2028 and the like, which may occur inside a chunk's text."""
    pending = ""
    async for text in response.aiter_text():
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


async def _clients(
    url: str, headers: dict, model: str, concurrency: int, indices: list[int],
    max_tokens: int | list[int], prompts: list[str] | list[list[int]], temperature: float,
) -> tuple[list[RequestResult], float, float]:  # fmt: skip
    """`concurrency` streaming clients in this process take the requests `indices` (request i
    sends `prompts[i % len(prompts)]` for `max_tokens`, or `max_tokens[i]` when a list) in turn;
    their results, and the wall-clock start and end (time.perf_counter: one clock for every
    process)."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as c:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in indices:
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                prompt = prompts[i % len(prompts)]
                n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
                results.append(await _one(c, model, prompt, n, temperature))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return results, start, time.perf_counter()


def _client_process(job: tuple) -> tuple[list[RequestResult], float, float, float]:
    """One client process of a level: its results, start, end and CPU seconds."""
    cpu = time.process_time()
    results, start, end = asyncio.run(_clients(*job))
    return results, start, end, time.process_time() - cpu


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds so far of process `pid` and the processes it started (the
    engine process, tensor-parallel workers) (Linux), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += map(int, (task / "children").read_text().split())
    return own + sum(_cpu_seconds(c) for c in children)


def _start_profiler(out: Path | None, pid: int | None) -> subprocess.Popen | None:
    """py-spy sampling the server and its children (the engine process) for PROFILE_S seconds,
    from PROFILE_DELAY_S into the level: flat stacks (one line per stack and its sample count)
    in `out`, to see where the server's time goes under load."""
    if out is None or pid is None:
        return None
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("--profile: py-spy is not on PATH; not profiling", file=sys.stderr)
        return None
    cmd = [
        py_spy, "record", "--pid", str(pid), "--subprocesses", "--threads", "--nonblocking",
        "--rate", "250", "--duration", str(PROFILE_S), "--format", "raw", "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(
        ["sh", "-c", f'sleep {PROFILE_DELAY_S} && exec "$@"', "sh", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _level(
    url: str, headers: dict, model: str, concurrency: int, n: int, max_tokens: int | list[int],
    processes: int = 1, server_pid: int | None = None,
    prompts: list[str] | list[list[int]] = PROMPTS, temperature: float = 0.8,
    profile: Path | None = None,
) -> LevelResult:  # fmt: skip
    """`concurrency` clients, spread over `processes` client processes (so that parsing the
    streams in Python is not what limits a level), run `n` requests."""
    processes = max(1, min(processes, concurrency))
    jobs = [
        (url, headers, model, len(range(p, concurrency, processes)), list(range(p, n, processes)),
         max_tokens, prompts, temperature)
        for p in range(processes)
    ]  # fmt: skip
    server_cpu = _cpu_seconds(server_pid)
    profiler = _start_profiler(profile, server_pid)
    if processes == 1:
        parts = [_client_process(jobs[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_client_process, jobs)
    if profiler is not None:
        profiler.wait()
    results = [r for part in parts for r in part[0]]
    duration = max(p[2] for p in parts) - min(p[1] for p in parts)
    ok = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            print(f"  failed: {r.error}", file=sys.stderr)
    tpots = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    return LevelResult(
        concurrency=concurrency,
        requests=n,
        ok=len(ok),
        duration_s=duration,
        requests_per_s=len(ok) / duration,
        output_tokens_per_s=sum(r.tokens for r in ok) / duration,
        ttft_ms=_pcts([r.ttft for r in ok]),
        itl_ms=_pcts([g for r in ok for g in r.gaps]),
        tpot_ms=_pcts(tpots),
        e2e_ms=_pcts([r.e2e for r in ok]),
        client_processes=processes,
        client_cpu_per_process=max(p[3] for p in parts) / duration,
        server_cpu=(_cpu_seconds(server_pid) - server_cpu) / duration if server_pid else None,
        text_chunks=sum(r.chunks for r in ok),
    )


def _table(levels: list[LevelResult]) -> str:
    head = (
        "| clients | requests | ok | req/s | out tok/s | TTFT p50 | TTFT p90 | TTFT p99 "
        "| ITL p50 | ITL p90 | ITL p99 | TPOT mean | e2e p50 | client CPU | server CPU |"
    )
    rows = [head, "|" + "---|" * 15]
    for lv in levels:
        rows.append(
            f"| {lv.concurrency} | {lv.requests} | {lv.ok} | {lv.requests_per_s:.2f} "
            f"| {lv.output_tokens_per_s:.1f} | {lv.ttft_ms['p50']:.0f} ms | {lv.ttft_ms['p90']:.0f} ms "
            f"| {lv.ttft_ms['p99']:.0f} ms | {lv.itl_ms['p50']:.0f} ms | {lv.itl_ms['p90']:.0f} ms "
            f"| {lv.itl_ms['p99']:.0f} ms | {lv.tpot_ms['mean']:.0f} ms | {lv.e2e_ms['p50']:.0f} ms "
            f"| {lv.client_cpu_per_process:.0%} x {lv.client_processes} "
            f"| {'-' if lv.server_cpu is None else f'{lv.server_cpu:.0%}'} |"
        )
    return "\n".join(rows)


def _offline(args: argparse.Namespace, level: LevelResult) -> dict:
    """The requests of `level` through the offline `LLM` on the same model and options, after the
    server has exited: what the engine does without the HTTP layer."""
    from nucleus.llm import LLM
    from nucleus.sampling_params import SamplingParams

    options = {}
    for flag in args.server_arg:
        if flag.startswith("--max-num-seqs="):
            options["max_num_seqs"] = int(flag.split("=", 1)[1])
        elif flag.startswith("--dtype="):
            options["dtype"] = flag.split("=", 1)[1]
    llm = LLM(args.model, **options)
    workload, max_tokens = _workload(args, level.concurrency)
    prompts = [workload[i % len(workload)] for i in range(level.requests)]
    params = [
        SamplingParams(
            max_tokens=max_tokens[i] if isinstance(max_tokens, list) else max_tokens,
            temperature=0.8,
            ignore_eos=True,
        )
        for i in range(level.requests)
    ]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    llm.engine.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "requests": len(prompts),
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds,
        "server_concurrency": level.concurrency,
        "server_fraction": level.output_tokens_per_s / (tokens / seconds),
    }


def _workload(
    args: argparse.Namespace, concurrency: int
) -> tuple[list[str] | list[list[int]], int | list[int]]:
    """The prompts and output lengths of a level: the chat prompts with `--max-tokens`, or the
    mix, seeded by the level's client count (its prompts are new to the server's prefix cache;
    the offline run takes the largest level's and clears its cache)."""
    if args.mix:
        return mixed_requests(args.mix, random.Random(concurrency))
    return PROMPTS, args.max_tokens


def _device(server_args: list[str]) -> str:
    if any("cuda" in a for a in server_args):
        return f"CUDA (server flags {' '.join(server_args)})"
    return f"{cpu_name()} CPU, {os.cpu_count()} cores, {platform.system()}"


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return "?"


def _update_docs(table: str, meta: dict) -> None:
    section = (
        f"{BEGIN}\n## Serving: latency and requests/s under load (`bench/serve.py`)\n\n"
        f"- command: `{meta['command']}`\n"
        f"- device: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}\n"
        f"- date: {meta['date']}\n"
        f"- model: `{meta['model']}`\n\n"
        f"Each level runs {meta['requests']} streaming `/v1/completions` requests of "
        f"{meta['max_tokens']} tokens (`ignore_eos`, temperature 0.8) from N concurrent clients "
        "against a `nucleus serve` process (`python -m nucleus.server.serve`) on the same "
        "machine. TTFT: request sent to first text chunk; ITL: gap between successive text "
        "chunks of one stream (one engine step each); TPOT: (last - first token) / (tokens - 1); "
        "req/s and out tok/s: completed requests and generated tokens over the level's wall "
        "time. Regenerate with the command above.\n\n"
        f"{table}\n{END}\n"
    )
    update_docs_section(BEGIN, END, section)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("NUCLEUS_API_KEY"))
    p.add_argument("--model", help="model path for the server started here (default: built-in)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="spread each level's clients over N processes",
    )
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "serve.json"))
    p.add_argument(
        "--update-docs", action="store_true", help="rewrite the section in docs/benchmarks.md"
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server")
    p.add_argument(
        "--mix",
        type=int,
        metavar="N",
        help="N seeded requests of random token ids, prompts of 32-1,024 tokens and outputs of "
        "32-512 (bench/gpu.py's mix), instead of the chat prompts; every level runs all N",
    )
    p.add_argument(
        "--profile",
        help="sample the server with py-spy during the largest level; flat stacks to this file",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="then run the largest level's requests through the offline LLM, for comparison",
    )
    args = p.parse_args(argv)

    proc = log = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        flags = ["--served-model-name", "bench", "--log-level", "warning"]
        flags += ["--model", args.model] if args.model else []
        proc, url, log = start_server(flags + args.server_arg, prefix="nucleus-bench-serve-")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        _level(url, headers, model, 2, 2, 4)  # warm-up
        levels = []
        counts = [int(x) for x in args.concurrency.split(",") if x]
        for c in counts:
            n = args.mix or max(args.requests, c)
            workload, max_tokens = _workload(args, c)
            print(f"concurrency {c}: {n} requests ...", file=sys.stderr, flush=True)
            pid = proc.pid if proc is not None else None
            profile = Path(args.profile) if args.profile and c == max(counts) else None
            levels.append(
                _level(
                    url, headers, model, c, n, max_tokens, args.client_processes, pid,
                    prompts=workload, profile=profile,
                )
            )  # fmt: skip
    finally:
        if proc is not None:
            stop_server(proc)
    table = _table(levels)
    print(table)
    offline = None
    if args.offline and not args.url:
        offline = _offline(args, max(levels, key=lambda lv: lv.concurrency))
        print(
            f"offline LLM, the same {offline['requests']} requests: "
            f"{offline['output_tokens_per_s']:.1f} out tok/s; the server at "
            f"{offline['server_concurrency']} clients reached {offline['server_fraction']:.0%} of it"
        )
    meta = {
        "model": args.model or "SmolLM2-135M-Instruct (default GGUF, 8-bit block CPU kernels)",
        "machine": _device(args.server_arg),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "max_tokens": "mix 32-512" if args.mix else args.max_tokens,
        "requests": args.mix or args.requests,
        "workload": f"seeded mix of {args.mix} (prompts 32-1,024 tokens)" if args.mix else "chat",
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "url": url if args.url else "started here",
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "levels": [asdict(lv) for lv in levels], "offline": offline}
    out.write_text(json.dumps(record, indent=2))
    print(f"JSON: {out}", file=sys.stderr)
    if args.update_docs:
        _update_docs(table, meta)
        print(f"updated {DOCS}", file=sys.stderr)
    if not all(lv.ok == lv.requests for lv in levels):
        if log is not None:
            print(f"some requests failed; server log: {log}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
