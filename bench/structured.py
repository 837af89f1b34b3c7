"""What structured outputs cost: a batch half JSON-Schema constrained against the same batch with
no constraint, on the CPU, in one process.

    python bench/structured.py [--num-requests 32] [--max-tokens 64] [--rounds 3]
                               [--before /work/main] [--threads 2]

Every request is a chat request to the default model (SmolLM2-135M-Instruct), greedy, with
`ignore_eos` and `max_tokens` tokens. In the mixed batch every other request carries a JSON Schema
(a few typed fields, then a `story` string of at least 2,000 characters) that no reply completes
within the budget, so both batches generate exactly the same number of tokens and the only
difference is the constraint work: compiling the schema, one mask per constrained row per step
(computed in a worker thread during the forward), applying it in the sampler, and advancing the
matcher. The two batches alternate for `--rounds` rounds (a shared machine's load falls on both);
each one's best counts. Because a shared machine's load swings the tok/s of single runs, the
script also times, inside the same runs, the constraint work on the engine thread (waiting for
the step's masks, starting the worker, compiling, feeding tokens to the matchers) and the sampler,
as shares of the run's wall time, and prints each round's ratio (its two runs are adjacent).

`--before DIR` also times the unconstrained batch with the nucleus of another checkout (a path
whose `nucleus/` is the code before structured outputs), in subprocesses alternating with this
checkout's: unconstrained requests must not have become slower.
A table goes to stdout and JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["comedy", "drama", "horror", "documentary"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "story": {"type": "string", "minLength": 2000},
    },
    "required": ["title", "year", "genre", "tags", "story"],
    "additionalProperties": False,
}
TOPICS = ["a lighthouse", "a lost cat", "the moon", "a bakery", "a robot", "a storm", "a river"]


def conversations(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Describe a film about {TOPICS[i % len(TOPICS)]} ({i})."}]
        for i in range(n)
    ]


class Timers:
    """Wall time spent inside chosen functions (wrapped in place), summed per name: the share of
    a run the constraint work takes, measured within the run itself, so a shared machine's load
    weighs on both sides of the ratio."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def instrument(llm) -> Timers:
    """Time the step, the sampler, and each piece of constraint work on the engine thread: the
    wait for the step's masks (whatever of the worker's work the forward did not hide), the
    matchers' compilation, starting the worker, and feeding tokens to the matchers."""
    from nucleus.engine import structured

    timers = Timers()
    engine = llm.engine
    timers.wrap(engine.runner, "execute", "step")
    timers.wrap(engine.runner, "sampler", "sampler")
    timers.wrap(engine.structured, "matchers", "compile")
    timers.wrap(engine.structured, "begin", "begin")
    timers.wrap(engine.structured, "accept", "accept")
    timers.wrap(structured.PendingMasks, "wait", "wait for masks")
    return timers


def run_batch(llm, convs, max_tokens: int, constrained: bool, timers: Timers | None = None):
    from nucleus.sampling_params import SamplingParams

    plain = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    params = [plain] * len(convs)
    if constrained:
        from nucleus.sampling_params import StructuredOutputsParams

        schema = SamplingParams(
            temperature=0,
            max_tokens=max_tokens,
            ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        )
        params = [schema if i % 2 else plain for i in range(len(convs))]
    t = time.perf_counter()
    outs = llm.chat(convs, params)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tok_per_s": tokens / elapsed,
        "sample_constrained": outs[1].outputs[0].text[:120] if constrained else None,
        "timers_s": timers.take() if timers is not None else {},
    }


def load(threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    from nucleus import LLM

    return LLM(max_num_seqs=64)


def unconstrained_only(args) -> None:
    """Subprocess mode (`--before`): one timed unconstrained batch, JSON on stdout."""
    llm = load(args.threads)
    convs = conversations(args.num_requests)
    run_batch(llm, convs[:4], 4, constrained=False)  # warm-up
    print(json.dumps(run_batch(llm, convs, args.max_tokens, constrained=False)))


def time_checkout(path: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, __file__, "--unconstrained-only", "--num-requests"]
    cmd += [str(args.num_requests), "--max-tokens", str(args.max_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--before", default=None, help="a checkout whose nucleus is the code before")
    ap.add_argument("--unconstrained-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.unconstrained_only:
        return unconstrained_only(args)

    llm = load(args.threads)
    convs = conversations(args.num_requests)
    run_batch(llm, convs[:4], 4, constrained=True)  # warm-up: kernels, llguidance's tokenizer
    timers = instrument(llm)
    plain, mixed = [], []
    for r in range(args.rounds):
        plain.append(run_batch(llm, convs, args.max_tokens, constrained=False, timers=timers))
        mixed.append(run_batch(llm, convs, args.max_tokens, constrained=True, timers=timers))
        print(
            f"round {r + 1}: unconstrained {plain[-1]['tok_per_s']:.1f} tok/s, "
            f"half constrained {mixed[-1]['tok_per_s']:.1f} tok/s",
            flush=True,
        )
    best_plain = max(plain, key=lambda x: x["tok_per_s"])
    best_mixed = max(mixed, key=lambda x: x["tok_per_s"])
    assert best_plain["tokens"] == best_mixed["tokens"], "the batches must generate alike"
    ratio = best_mixed["tok_per_s"] / best_plain["tok_per_s"]
    # Each round's two runs are next to each other in time: their ratio sees the least drift.
    paired = sorted(m["tok_per_s"] / p["tok_per_s"] for p, m in zip(plain, mixed, strict=True))
    median_paired = paired[len(paired) // 2]

    here = str(Path(__file__).resolve().parent.parent)
    before_runs, after_runs = [], []
    if args.before:
        del llm  # one model in memory at a time
        for _ in range(args.rounds):
            before_runs.append(time_checkout(args.before, args))
            after_runs.append(time_checkout(here, args))
            print(
                f"unconstrained, separate processes: before {before_runs[-1]['tok_per_s']:.1f}, "
                f"now {after_runs[-1]['tok_per_s']:.1f} tok/s",
                flush=True,
            )

    rows = [
        ("unconstrained batch", best_plain["tok_per_s"], 1.0),
        ("half JSON-Schema constrained", best_mixed["tok_per_s"], ratio),
    ]
    print(f"paired ratios by round: {[round(x, 3) for x in paired]}, median {median_paired:.3f}")
    before_after = []
    if before_runs:
        b = max(r["tok_per_s"] for r in before_runs)
        a = max(r["tok_per_s"] for r in after_runs)
        rows += [("unconstrained, code before", b, 1.0), ("unconstrained, this code", a, a / b)]
        before_after = sorted(
            x["tok_per_s"] / y["tok_per_s"] for y, x in zip(before_runs, after_runs, strict=True)
        )
        print(
            f"now/before paired by round: {[round(x, 3) for x in before_after]}, "
            f"median {before_after[len(before_after) // 2]:.3f}"
        )
    print(f"\n{args.num_requests} requests x {args.max_tokens} tokens, best of {args.rounds}")
    print(f"| {'batch':<32} | {'output tok/s':>12} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 14}|{'-' * 8}|")
    for name, tps, rel in rows:
        print(f"| {name:<32} | {tps:>12.1f} | {rel:>6.3f} |")
    print(f"\nconstrained sample: {best_mixed['sample_constrained']!r}")
    # The constraint work on the engine thread, as a share of the mixed runs' time (all rounds).
    total = sum(r["elapsed_s"] for r in mixed)
    work = {}
    for r in mixed:
        for name, t in r["timers_s"].items():
            work[name] = work.get(name, 0.0) + t
    print(
        f"\nwhere the half-constrained runs spent their {total:.1f} s (engine thread, all rounds):"
    )
    for name in ("step", "sampler", "wait for masks", "begin", "compile", "accept"):
        t = work.get(name, 0.0)
        print(f"  {name:<16} {t:8.3f} s  {100 * t / total:6.2f} %")
    plain_sampler = sum(r["timers_s"].get("sampler", 0.0) for r in plain)
    plain_total = sum(r["elapsed_s"] for r in plain)
    print(
        f"  (unconstrained runs: sampler {100 * plain_sampler / plain_total:.2f} % of their time)"
    )

    result = {
        "bench": "structured",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "schema": SCHEMA,
        "unconstrained_runs": plain,
        "mixed_runs": mixed,
        "ratio_of_bests": ratio,
        "paired_ratios": paired,
        "median_paired_ratio": median_paired,
        "constraint_work_share": {
            name: sum(r["timers_s"].get(name, 0.0) for r in mixed)
            / sum(r["elapsed_s"] for r in mixed)
            for name in ("step", "sampler", "wait for masks", "begin", "compile", "accept")
        },
        "before_runs": before_runs,
        "now_over_before_paired": before_after,
        "after_runs": after_runs,
    }
    out = Path(args.out or Path(here) / "bench" / "results" / "structured.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
