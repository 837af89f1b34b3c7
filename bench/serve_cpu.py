"""The server's CPU per streamed chunk: `nucleus serve` over a near-free engine, so that what is
measured is the serving layer (engine bookkeeping, hand-off, chunks, HTTP), not the model.

    python bench/serve_cpu.py                       # this checkout only
    python bench/serve_cpu.py --peer /work/main     # and another checkout's server, interleaved
    python bench/serve_cpu.py --update-docs         # also rewrite its section of docs/benchmarks.md

The engine is the real one (`LLMEngine` in an `AsyncLLM`, the Llama 3 tokenizer detokenizing)
over a random model of one layer, width 32 and a vocabulary of the tokenizer's first `--vocab`
ids (1,024: short English pieces), greedy, one torch thread: an engine step of 256 rows costs a
few milliseconds, so the serving layer dominates the server's CPU. The server is
`nucleus.server.serve` itself with that engine in place of a loaded model (built in the engine
process, with `AsyncLLM.from_process`, in process mode). Each round starts a
server, warms it up, runs `--requests` streaming `/v1/completions` of `--max-tokens` tokens from
`--streams` clients at once (token-id prompts; clients over `--client-processes` processes), and
reads the server's CPU seconds (all threads of the server process and of the processes it
started: the engine process, /proc) over the level. `--engine thread,process` (the default)
measures this checkout's server with the engine in a thread of its process and in a process of
its own, alternating in each round. A round of the
engine alone (the same requests, streamed, stepped in a loop: `--engine-only`) gives what of that
the engine costs. With `--peer`, rounds alternate between the checkouts (this one first), so that
the machine's noise falls on both alike. Prints a table and writes JSON (default
bench/results/serve_cpu.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import REPO, cpu_name, start_server, stop_server, update_docs_section
from serve import _level

BEGIN, END = "<!-- bench/serve_cpu.py:begin -->", "<!-- bench/serve_cpu.py:end -->"
PROMPT_TOKENS = 16


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(PROMPT_TOKENS)] for _ in range(4)]


def _tiny_engine(vocab: int, max_num_seqs: int, stream_interval: int = 1):
    """The near-free engine (built in the process of the checkout measured)."""
    import torch

    from nucleus.assets import asset_path
    from nucleus.config import ModelConfig
    from nucleus.engine.engine import EngineConfig, LLMEngine
    from nucleus.model import Transformer
    from nucleus.tokenizer import Tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = ModelConfig(
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        vocab_size=vocab,
        ffn_hidden_dim=64,
        max_position_embeddings=2048,
    )
    model = Transformer(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    options = {"stream_interval": stream_interval} if stream_interval > 1 else {}
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, **options)
    return LLMEngine(model.eval(), Tokenizer(asset_path("llama3-tokenizer")), config)


def _tiny_llm(vocab: int, max_num_seqs: int, stream_interval: int):
    """An `LLM` over the near-free engine (what the engine process builds)."""
    from nucleus.llm import LLM

    return LLM.from_engine(_tiny_engine(vocab, max_num_seqs, stream_interval), name="tiny")


def _serve_tiny(argv: list[str]) -> int:
    """`nucleus serve` (its flags in `argv`) with the near-free engine, in a thread of the server
    with `--engine-in-thread`, else in a process of its own (as `nucleus serve` runs it)."""
    from nucleus.assets import asset_path
    from nucleus.async_llm import AsyncLLM
    from nucleus.server import serve
    from nucleus.tokenizer import Tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--stream-interval", type=int, default=1)
    ours, flags = p.parse_known_args(argv)
    shape = (ours.vocab, ours.max_num_seqs, ours.stream_interval)

    def build_engine(args: argparse.Namespace) -> AsyncLLM:
        if getattr(args, "engine_in_thread", True):
            return AsyncLLM.from_engine(_tiny_engine(*shape), model_name="tiny")
        tokenizer = Tokenizer(asset_path("llama3-tokenizer"))
        return AsyncLLM.from_process(functools.partial(_tiny_llm, *shape), tokenizer=tokenizer)

    serve.build_engine = build_engine
    return serve.main(flags)


def _engine_only(argv: list[str]) -> int:
    """The level's requests through the engine alone, streamed (a step loop, as `AsyncLLM`
    runs it): prints the CPU seconds and the outputs, as JSON."""
    from nucleus.sampling_params import SamplingParams

    p = argparse.ArgumentParser()
    for name in ("--vocab", "--max-num-seqs", "--requests", "--max-tokens"):
        p.add_argument(name, type=int, required=True)
    args = p.parse_args(argv)
    engine = _tiny_engine(args.vocab, args.max_num_seqs)
    prompts = _prompts(args.vocab)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    cpu = time.process_time()
    outputs = 0
    for i in range(args.requests):
        engine.add_request(f"r{i}", prompts[i % len(prompts)], params)
    while engine.has_unfinished():
        outputs += len(engine.step())
    print(json.dumps({"cpu_s": time.process_time() - cpu, "outputs": outputs}))
    return 0


def _run_engine_only(checkout: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--engine-only"]
    cmd += ["--vocab", str(args.vocab), "--max-num-seqs", str(args.streams)]
    cmd += ["--requests", str(args.requests), "--max-tokens", str(args.max_tokens)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "cpu_us_per_output": result["cpu_s"] / result["outputs"] * 1e6}


def _round(checkout: Path, mode: str, args: argparse.Namespace) -> dict:
    flags = ["--vocab", str(args.vocab), "--max-num-seqs", str(args.streams)]
    flags += ["--engine-in-thread"] if mode == "thread" else []
    flags += ["--stream-interval", str(args.stream_interval)]
    flags += ["--served-model-name", "tiny", "--log-level", "warning"]
    flags += ["--max-waiting", str(max(args.requests, 1024))]
    proc, url, _ = start_server(
        flags, checkout=checkout, prefix="nucleus-serve-cpu-", entry=(__file__, "--serve-tiny")
    )
    try:
        prompts = _prompts(args.vocab)
        _level(url, {}, "tiny", 8, 16, 8, 1, None, prompts, 0.0)  # warm-up
        level = _level(
            url, {}, "tiny", args.streams, args.requests, args.max_tokens,
            args.client_processes, proc.pid, prompts, 0.0,
        )  # fmt: skip
    finally:
        stop_server(proc)
    server_cpu_s = (level.server_cpu or 0.0) * level.duration_s
    tokens = level.output_tokens_per_s * level.duration_s
    return {
        "checkout": str(checkout),
        "engine": mode,
        "ok": level.ok,
        "requests": level.requests,
        "tokens": round(tokens),
        "chunks": level.text_chunks,
        "duration_s": level.duration_s,
        "server_cpu_s": server_cpu_s,
        "server_cores": level.server_cpu,
        "cpu_us_per_chunk": server_cpu_s / max(level.text_chunks, 1) * 1e6,
        "cpu_us_per_token": server_cpu_s / max(tokens, 1) * 1e6,
        "output_tokens_per_s": level.output_tokens_per_s,
        "client_cpu_per_process": level.client_cpu_per_process,
        "level": asdict(level),
    }


def _table(rounds: list[dict], engine: dict[str, dict]) -> str:
    rows = [
        "| checkout | round | server CPU s | chunks | tokens | CPU us / chunk | CPU us / token "
        "| out tok/s | server cores |",
        "|" + "---|" * 9,
    ]
    for r in rounds:
        rows.append(
            f"| {r['name']} | {r['round']} | {r['server_cpu_s']:.1f} | {r['chunks']:,} "
            f"| {r['tokens']:,} | {r['cpu_us_per_chunk']:.0f} | {r['cpu_us_per_token']:.0f} "
            f"| {r['output_tokens_per_s']:,.0f} | {r['server_cores']:.2f} |"
        )
    for name, e in engine.items():
        rows.append(
            f"| {name}: engine alone | - | {e['cpu_s']:.1f} | - | {e['outputs']:,} outputs | - "
            f"| {e['cpu_us_per_output']:.0f} | - | - |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-tiny"]:
        return _serve_tiny(argv[1:])
    if argv[:1] == ["--engine-only"]:
        return _engine_only(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, help="another checkout to measure in alternate rounds")
    p.add_argument("--rounds", type=int, default=2, help="rounds per checkout")
    p.add_argument("--streams", type=int, default=256, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the engine's (the server's flag of that name)",
    )
    p.add_argument(
        "--engine",
        default="thread,process",
        help="where this checkout's server runs the engine: thread, process, or both "
        "(alternating in each round)",
    )
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "serve_cpu.json"))
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)

    checkouts = {"this": REPO} | ({"peer": args.peer.resolve()} if args.peer else {})
    # This checkout in each engine mode asked for; a peer as it serves by default.
    configs = [(f"this, engine {mode}", REPO, mode) for mode in args.engine.split(",")]
    if args.peer:
        configs.append(("peer", args.peer.resolve(), "default"))
    rounds = []
    for k in range(args.rounds):
        for name, checkout, mode in configs:
            print(f"round {k + 1}: {name} ({checkout}) ...", file=sys.stderr, flush=True)
            rounds.append({"name": name, "round": k + 1, **_round(checkout, mode, args)})
    engine = {name: _run_engine_only(checkout, args) for name, checkout in checkouts.items()}
    table = _table(rounds, engine)
    print(table)
    summary = {
        name: {
            key: statistics.median(r[key] for r in rounds if r["name"] == name)
            for key in ("cpu_us_per_chunk", "cpu_us_per_token", "output_tokens_per_s")
        }
        for name, _, _ in configs
    }
    for name, medians in summary.items():
        print(
            f"{name}: median server CPU {medians['cpu_us_per_chunk']:.0f} us / chunk, "
            f"{medians['cpu_us_per_token']:.0f} us / token, "
            f"{medians['output_tokens_per_s']:,.0f} out tok/s"
        )
    meta = {
        "machine": f"{cpu_name()} CPU, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/serve_cpu.py " + " ".join(argv),
        "checkouts": {k: str(v) for k, v in checkouts.items()},
        "load_average": os.getloadavg(),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "rounds": rounds, "engine_only": engine, "medians": summary}
    out.write_text(json.dumps(record, indent=2))
    print(f"JSON: {out}", file=sys.stderr)
    if args.update_docs:
        section = (
            f"{BEGIN}\n#### Server CPU per streamed chunk (`bench/serve_cpu.py`)\n\n"
            f"- command: `{meta['command']}`\n- machine: {meta['machine']} (shared)\n"
            f"- date: {meta['date']}\n\n{table}\n{END}\n"
        )
        update_docs_section(BEGIN, END, section)
    return 0 if all(r["ok"] == r["requests"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
