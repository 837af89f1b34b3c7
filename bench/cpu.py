"""CPU benchmark: nucleus against llama.cpp on the same GGUF, interleaved, each in its own process.

    python bench/cpu.py                                 # the default model, 3 rounds
    python bench/cpu.py --rounds 5 --threads 2 --update-docs
    python bench/cpu.py --llamacpp-python /work/venvs/llamacpp/bin/python --model x.gguf

Every round runs, for nucleus then llama.cpp (`llama-cpp-python`, built for this CPU, in its own
virtual environment: `--llamacpp-python`), each measure in a new process, so that both meet the
same outside load within seconds of each other:
- cold start: from spawning the process to the first generated token on its stdout
  (nucleus: `nucleus generate --max-tokens 1`, greedy; llama.cpp: a script that imports
  `llama_cpp`, loads the model, evaluates the prompt and prints the greedy token), and that
  process's peak resident memory (`ru_maxrss`);
- batch-1 decode: a 32-token prompt (token ids), then 128 greedy tokens, timed from the first
  generated token to the last (nucleus: its engine on the CPU path, `LLMEngine.step`;
  llama.cpp: `Llama.eval` one token at a time, the argmax of its logits);
- prefill: the time to the first token of a 512-token prompt;
- nucleus only: `import nucleus.llm` and `LLM()` ready, in that worker.
Both run with `--threads` threads. Prints a table of the ranges over rounds and each measure's
ratio (best against best), writes JSON (default bench/results/cpu.json), and with `--update-docs`
rewrites its section of docs/benchmarks.md.

This file is also the worker both engines run (`--worker nucleus|llamacpp`): at the top level it
imports only the standard library, as llama.cpp's environment has no nucleus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench/cpu.py:begin -->", "<!-- bench/cpu.py:end -->"
PROMPT = "The capital of France is"
DECODE_PROMPT = list(range(1000, 1032))  # 32 token ids
DECODE_TOKENS = 128  # --decode-tokens
PREFILL_TOKENS = 512  # --prefill-tokens


def prefill_prompt() -> list[int]:
    """512 token ids, the same for both engines (a fixed pseudo-random walk over the vocabulary)."""
    ids, x = [], 12345
    for _ in range(PREFILL_TOKENS):
        x = (x * 1103515245 + 12345) % (1 << 31)
        ids.append(100 + x % 40000)
    return ids


# ---- workers (run in their own processes) -------------------------------------------------------


def _nucleus_worker(model: str | None, threads: int) -> dict:
    t0 = time.perf_counter()
    from nucleus.engine.engine import EngineConfig, LLMEngine
    from nucleus.loaders import load_model_files
    from nucleus.sampling_params import SamplingParams

    files = load_model_files(model)
    engine = LLMEngine(
        files.build_cpu_model(num_threads=threads),
        files.tokenizer,
        EngineConfig(max_num_seqs=1, max_model_len=2048, max_num_batched_tokens=PREFILL_TOKENS),
    )
    ready = time.perf_counter() - t0

    def run(ids: list[int], n: int) -> tuple[float, float]:
        """(seconds to the first token, decode tok/s after it)."""
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        engine.add_request(f"r{time.monotonic_ns()}", ids, params, stream=True)
        first = last = None
        count = 0
        while engine.has_unfinished():
            for out in engine.step():
                count = len(out.outputs[0].token_ids)
                now = time.perf_counter()
                first = first or now
                last = now
        rate = (count - 1) / (last - first) if count > 1 else 0.0
        return first - start, rate

    run(DECODE_PROMPT, 4)  # warm: the first step maps the weights' pages
    _, decode = run(DECODE_PROMPT, DECODE_TOKENS)
    prefill, _ = run(prefill_prompt(), 1)

    t1 = time.perf_counter()
    import nucleus.llm

    imported = time.perf_counter() - t1
    t2 = time.perf_counter()
    llm = nucleus.llm.LLM(model, num_threads=threads)
    llm_ready = time.perf_counter() - t2
    del llm
    return {
        "decode_tok_s": decode,
        "prefill_s": prefill,
        "engine_ready_s": ready,
        "import_llm_s": imported,
        "llm_ready_s": llm_ready,
    }


def _llamacpp_load(model: str, threads: int):
    from llama_cpp import Llama

    return Llama(
        model,
        n_ctx=2048,
        n_batch=PREFILL_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def _llamacpp_worker(model: str, threads: int) -> dict:
    import numpy as np

    llm = _llamacpp_load(model, threads)

    def greedy() -> int:  # the last token's logits (llama-cpp-python keeps no scores by default)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    vocab = llm.n_vocab()

    llm.reset()
    llm.eval(DECODE_PROMPT[:4])  # warm
    llm.reset()
    llm.eval(DECODE_PROMPT)
    token = greedy()
    start = time.perf_counter()
    for _ in range(DECODE_TOKENS - 1):
        llm.eval([token])
        token = greedy()
    decode = (DECODE_TOKENS - 1) / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    llm.eval(prefill_prompt())
    greedy()
    prefill = time.perf_counter() - start
    return {"decode_tok_s": decode, "prefill_s": prefill}


def _llamacpp_first_token(model: str, threads: int) -> None:
    """The cold-start process: load, evaluate the prompt, print the greedy token."""
    import numpy as np

    llm = _llamacpp_load(model, threads)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    token = int(np.argmax(logits))
    sys.stdout.write(llm.detokenize([token]).decode(errors="replace") or "?")
    sys.stdout.flush()


# ---- the driver -----------------------------------------------------------------------------


def _first_output(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run `cmd`; seconds from spawning it to its first byte on stdout, and its peak RSS (MB).

    Spawned with `posix_spawn` (no copy of this process's memory): a forked child would start
    with this process's resident size, which Linux then counts in the child's `ru_maxrss`."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in (out_r, err_r, out_w, err_w)]
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, env, file_actions=actions)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        first = out.read(1)
        elapsed = time.perf_counter() - start
        out.read()
        stderr = err.read()
    _, status, usage = os.wait4(pid, 0)
    if not first or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {stderr.decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def _worker_result(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _default_model() -> str:
    sys.path.insert(0, str(REPO))
    from nucleus.assets import asset_path
    from nucleus.loaders import DEFAULT_MODEL_ASSET

    return str(asset_path(DEFAULT_MODEL_ASSET))


def run_rounds(args: argparse.Namespace) -> dict:
    model = args.model or _default_model()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    me = str(Path(__file__).resolve())
    common = ["--model", model, "--threads", str(args.threads)]
    common += ["--decode-tokens", str(DECODE_TOKENS), "--prefill-tokens", str(PREFILL_TOKENS)]
    nucleus_generate = [sys.executable, "-m", "nucleus", "generate", "--max-tokens", "1"]
    nucleus_generate += ["--temperature", "0"]
    nucleus_generate += ["--model", model, PROMPT]
    rounds = []
    for i in range(args.rounds):
        r: dict = {}
        r["nucleus_first_token_s"], r["nucleus_peak_rss_mb"] = _first_output(nucleus_generate, env)
        cold = [args.llamacpp_python, me, "--worker", "llamacpp-first-token", *common]
        r["llamacpp_first_token_s"], r["llamacpp_peak_rss_mb"] = _first_output(cold, env)
        n = _worker_result([sys.executable, me, "--worker", "nucleus", *common], env)
        ll = _worker_result([args.llamacpp_python, me, "--worker", "llamacpp", *common], env)
        r |= {f"nucleus_{k}": v for k, v in n.items()} | {f"llamacpp_{k}": v for k, v in ll.items()}
        rounds.append(r)
        print(f"round {i + 1}/{args.rounds}: " + json.dumps({k: round(v, 3) for k, v in r.items()}))
    return {"model": model, "threads": args.threads, "rounds": rounds}


def measures() -> list[tuple[str, str, str, bool]]:
    """(key, label, unit, higher is better) of each measure."""
    return [
        (
            "decode_tok_s",
            f"batch-1 decode, 32-token prompt, {DECODE_TOKENS} new tokens",
            "tok/s",
            True,
        ),
        ("prefill_s", f"prefill of {PREFILL_TOKENS} tokens", "s", False),
        ("first_token_s", "new process to first token", "s", False),
        ("peak_rss_mb", "peak RSS of that process", "MB", False),
    ]


def table(result: dict) -> str:
    rounds = result["rounds"]

    def span(key: str) -> str:
        values = [r[key] for r in rounds if key in r]
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        fmt = "{:.0f}" if max(values) >= 100 else "{:.2f}" if max(values) < 10 else "{:.1f}"
        return (
            fmt.format(lo)
            if fmt.format(lo) == fmt.format(hi)
            else f"{fmt.format(lo)}-{fmt.format(hi)}"
        )

    lines = [
        "| measure | nucleus | llama.cpp | nucleus / llama.cpp (best vs best) |",
        "|---|---|---|---|",
    ]
    for key, label, unit, higher in measures():
        ours = [r[f"nucleus_{key}"] for r in rounds]
        theirs = [r[f"llamacpp_{key}"] for r in rounds]
        if higher:
            ratio = f"{max(ours) / max(theirs):.2f}x faster"
        else:
            ratio = f"{min(theirs) / min(ours):.2f}x {'faster' if unit == 's' else 'less'}"
        lines.append(
            f"| {label} ({unit}) | {span(f'nucleus_{key}')} | {span(f'llamacpp_{key}')} | {ratio} |"
        )
    for key, label in (
        ("import_llm_s", "`import nucleus.llm` (torch included)"),
        ("llm_ready_s", "`LLM()` ready, after the import"),
        ("engine_ready_s", "CPU engine ready from a new process (imports included)"),
    ):
        lines.append(f"| {label} (s) | {span(f'nucleus_{key}')} | | |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    from common import cpu_name  # the driver's only: the workers import the standard library

    return f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}"


def _update_docs(text_table: str, meta: dict) -> None:
    from common import update_docs_section  # the driver's only, as in `_machine`

    section = (
        f"{BEGIN}\n## CPU: nucleus against llama.cpp (`bench/cpu.py`)\n\n"
        f"- command: `{meta['command']}`\n"
        f"- machine: {meta['machine']}; {meta['threads']} threads each\n"
        f"- date: {meta['date']}\n"
        f"- model: `{Path(meta['model']).name}`; llama.cpp: llama-cpp-python "
        f"{meta['llamacpp_version']} built for this CPU\n\n"
        f"{meta['rounds']} interleaved rounds; each cell is the range over rounds, each measure "
        "a new process per engine (see the script's docstring for what is timed). nucleus runs "
        "its CPU path: the C forward pass over the GGUF's blocks with 8-bit activations.\n\n"
        f"{text_table}{END}\n"
    )
    update_docs_section(BEGIN, END, section)


def main(argv: list[str] | None = None) -> int:
    global DECODE_TOKENS, PREFILL_TOKENS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GGUF file (default: the built-in model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    p.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS)
    p.add_argument(
        "--llamacpp-python",
        default=os.environ.get("LLAMACPP_PYTHON", "/work/venvs/llamacpp/bin/python"),
        help="the Python of a virtual environment with llama-cpp-python",
    )
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "cpu.json"))
    p.add_argument("--update-docs", action="store_true", help="rewrite its docs section")
    p.add_argument(
        "--worker", choices=["nucleus", "llamacpp", "llamacpp-first-token"], help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    DECODE_TOKENS, PREFILL_TOKENS = args.decode_tokens, args.prefill_tokens

    if args.worker == "nucleus":
        print(json.dumps(_nucleus_worker(args.model, args.threads)))
        return 0
    if args.worker == "llamacpp":
        print(json.dumps(_llamacpp_worker(args.model, args.threads)))
        return 0
    if args.worker == "llamacpp-first-token":
        _llamacpp_first_token(args.model, args.threads)
        return 0

    result = run_rounds(args)
    version = subprocess.run(
        [args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    meta = {
        "command": "python bench/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "rounds": args.rounds,
        "model": result["model"],
        "llamacpp_version": version,
    }
    text_table = table(result)
    print(text_table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **result}, indent=2))
    medians = {
        key: statistics.median(r[key] for r in result["rounds"]) for key in result["rounds"][0]
    }
    print("medians:", json.dumps({k: round(v, 3) for k, v in medians.items()}))
    if args.update_docs:
        _update_docs(text_table, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
