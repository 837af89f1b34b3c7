"""GPU speed of nucleus beside its peers, in one process on one CUDA device.

Llama-3-8B shapes with random bf16 weights (speed does not depend on the values):
1. the ceilings, measured here: device-to-device copy bandwidth (bytes read + written) and a
   bf16 8192^3 matrix product; and what cuBLAS reaches on the model's matrices at 1 and 8 rows;
2. decode, through `LLM` (Triton kernels, CUDA graphs, async scheduling) at each batch size:
   128-token prompts, 256 new tokens each, greedy, EOS ignored; tok/s = new tokens / wall time
   of the `generate` call (prefill included), best of `--repeats`; `--profile` adds the CUDA time
   of a batch-1 decode step by kernel;
3. throughput (`--throughput`), through `LLM` with up to 256 sequences: 256 requests of 128
   prompt / 256 output tokens at once, and a seeded mix of 512 requests (prompts 32-1,024,
   outputs 32-512 tokens); output tok/s and prompt + output tok/s;
4. the peers (`gpu_peers.py`): gpt-fast's own `generate` for decode (`--gpt-fast DIR` holding
   its `model.py`, `generate.py`, `tokenizer.py`), transformers' continuous batching
   (`generate_batch`, paged SDPA) on the 256-request workload (`--transformers`).

The memory limit at batch 1 is the copy bandwidth over the weight bytes read per token.
Run: `python bench/gpu.py --throughput --transformers --gpt-fast .carry/gpt-fast --out DIR`.
Prints tables; writes `gpu.json` into `--out`. With `--tp N`, tensor parallelism over N GPUs
instead (`gpu_tp.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from common import mixed_requests
from gpu_peers import gpt_fast_decode, timed, transformers_continuous_batching

from nucleus.config import ModelConfig
from nucleus.distributed import TensorParallel, checkpoint_layout
from nucleus.distributed.layers import Slot
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.llm import LLM
from nucleus.loaders import build_transformer
from nucleus.loaders.weights import Weights
from nucleus.model import Transformer
from nucleus.sampling_params import SamplingParams
from nucleus.tokenizer import Tokenizer

LLAMA3_8B = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "multiple_of": 1024,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
}


def measure_ceilings() -> dict[str, float]:
    x = torch.randint(0, 255, (2**31,), dtype=torch.uint8, device="cuda")  # 2 GiB, not zeros
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    copy_gbs = 20 * 2 * x.numel() / (start.elapsed_time(end) / 1e3) / 1e9
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": tflops}


def linear_bandwidth(rows: tuple[int, ...] = (1, 8)) -> list[dict]:
    """Achieved bandwidth of `F.linear` (cuBLAS) on the Llama-3-8B matrices at small row counts:
    weight bytes over the mean time of 48 back-to-back products (launches queued ahead, so host
    latency is hidden), rotating over 4 weight copies so that no run reads the last from L2."""
    shapes = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336),
              "head": (128256, 4096)}  # fmt: skip
    out = []
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for w in ws:
                torch.nn.functional.linear(x, w)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(48):
                torch.nn.functional.linear(x, ws[i % 4])
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3 / 48
            out.append({"matrix": name, "rows": m, "us": t * 1e6, "GBps": n * k * 2 / t / 1e9})
        del ws
    return out


class RandomWeights(Weights):
    """Meta-named random weights for a config, made on `device` tensor by tensor (norms 1,
    matrices N(0, 0.02)), each from a seed of its own: every rank cuts its piece from the same
    full tensor, made on its own device; nothing goes to disk or through host memory."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, seed: int = 0) -> None:
        with torch.device("meta"):
            self.layout = checkpoint_layout(Transformer(config))
        super().__init__(self.layout)
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.layout[name].shape
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed ^ zlib.crc32(name.encode()))
        w = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) * 0.02
        return w.to(self.dtype)

    def local(self, name: str, slot: Slot, rank: int, world_size: int) -> torch.Tensor:
        return slot.split.shard(self[name], rank, world_size).clone()  # the full one goes


def random_weights(params: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Meta-named random weights for `params`, whole (`RandomWeights`)."""
    return dict(RandomWeights(ModelConfig.from_meta_params(params), dtype, device, seed))


def random_shard(params: dict, dtype: torch.dtype, seed: int, tp: TensorParallel) -> Transformer:
    """Rank `tp`'s shard of a random model of shape `params`, made on its device."""
    config = ModelConfig.from_meta_params(params)
    weights = RandomWeights(config, dtype, tp.device, seed)
    return build_transformer(config, weights, device=tp.device, dtype=dtype, tp=tp)


def nucleus_llm(params: dict, tokenizer, *, max_num_seqs: int, max_model_len: int, **options):
    config = ModelConfig.from_meta_params(params)
    weights = random_weights(params, torch.bfloat16, "cuda")
    model = build_transformer(config, weights, device="cuda", dtype=torch.bfloat16)
    del weights
    engine_config = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len, **options)
    return LLM.from_engine(LLMEngine(model, tokenizer, engine_config), name="llama-3-8b-random")


def nucleus_decode(llm: LLM, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    seconds = timed(lambda: cold_generate(llm, prompts, params), repeats=repeats)
    return len(prompts) * new_tokens / seconds


def throughput_workloads(seed: int = 0) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Prompts and output lengths: 256 x (128 in / 256 out), and the seeded 512-request mix."""
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(0, 128000) for _ in range(n)]

    uniform = ([prompt(128) for _ in range(256)], [256] * 256)
    return {"256x128/256": uniform, "mix512": mixed_requests(512, rng)}


class LaunchLog:
    """What the runner launched, when: the time from one launch to the next is charged to the
    first, by kind (a decode step launched ahead, a decode step, or a step with prefill)."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.records: list[tuple[float, str, int, int]] = []
        launch = self.runner.launch

        def logged(batch, after=None, **options):
            prefill = any(n > 1 for n in batch.num_tokens)
            kind = "prefill/mixed" if prefill else ("decode ahead" if after else "decode")
            self.records.append((time.perf_counter(), kind, len(batch), sum(batch.num_tokens)))
            return launch(batch, after, **options)

        self.runner.launch = logged

    def summary(self) -> dict:
        out: dict[str, dict] = {}
        pairs = zip(self.records, self.records[1:], strict=False)  # each launch and the next
        for (t, kind, rows, tokens), (t_next, *_) in pairs:
            entry = out.setdefault(kind, {"steps": 0, "seconds": 0.0, "rows": 0, "tokens": 0})
            entry["steps"] += 1
            entry["seconds"] += t_next - t
            entry["rows"] += rows
            entry["tokens"] += tokens
        return out

    def close(self) -> None:
        del self.runner.launch  # the instance attribute: the method shows through again


def cold_generate(llm: LLM, prompts: list[list[int]], params) -> None:
    """`llm.generate` with an empty prefix cache: every run computes every prompt."""
    llm.engine.block_manager.reset_prefix_cache()
    llm.generate(prompts, params)


def nucleus_throughput(
    llm: LLM, prompts: list[list[int]], outs: list[int], repeats: int, *, timeline: bool
) -> dict:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outs]
    seconds = timed(lambda: cold_generate(llm, prompts, params), repeats=repeats)
    out_tokens, in_tokens = sum(outs), sum(map(len, prompts))
    result = {
        "seconds": seconds,
        "output_tok_s": out_tokens / seconds,
        "total_tok_s": (out_tokens + in_tokens) / seconds,
        "requests": len(prompts),
    }
    if timeline:
        log = LaunchLog(llm)  # one more run, for where its time goes
        cold_generate(llm, prompts, params)
        log.close()
        result["steps"] = log.summary()
    return result


def nucleus_profile(llm: LLM, prompt: list[int], steps: int = 20) -> list[dict]:
    """CUDA time per kernel over `steps` decode steps (graph replays included), largest first."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    overlap = engine.config  # no step launched ahead: exactly `steps` steps inside the window
    engine.config = replace(overlap, async_scheduling=False)
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    engine.add_request("profile", prompt, params, stream=False)
    engine.step()  # the prefill
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    engine.config = overlap
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if cuda_us > 0:
            rows.append(
                {"kernel": evt.key[:90], "us_per_step": cuda_us / steps, "calls": evt.count}
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:25]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the asset)")
    parser.add_argument("--gpt-fast", type=Path, default=None, help="gpt-fast's files")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--timeline", action="store_true", help="where throughput runs spend time")
    parser.add_argument("--linear", action="store_true", help="cuBLAS bandwidth per matrix")
    parser.add_argument("--transformers", action="store_true", help="its continuous batching")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tp", type=int, default=0, help="tensor parallelism over N GPUs instead")
    parser.add_argument("--parts", default="allreduce,check,8b,70b", help="with --tp: which")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tp:
        from gpu_tp import tp_main

        return tp_main(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from nucleus.assets import asset_path

    tokenizer = Tokenizer(args.tokenizer or asset_path("llama3-tokenizer"))
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "shape": "Llama-3-8B, random bf16 weights",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }
    results |= measure_ceilings()
    print(results, flush=True)
    save = lambda: (args.out / "gpu.json").write_text(json.dumps(results, indent=2))  # noqa: E731

    results["linear_bandwidth"] = linear_bandwidth() if args.linear else []
    for row in results["linear_bandwidth"]:
        print(
            f"F.linear {row['matrix']:>5} x{row['rows']}: {row['us']:7.1f} us {row['GBps']:6.0f} GB/s"
        )
    save()

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 128000, (max(batch_sizes), args.prompt_len), generator=g).tolist()
    llm = nucleus_llm(
        LLAMA3_8B,
        tokenizer,
        max_num_seqs=max(256 if args.throughput else 1, *batch_sizes),
        max_model_len=2048 if args.throughput else args.prompt_len + args.new_tokens + 64,
        enforce_eager=args.enforce_eager,
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    results["weight_GB"] = weight_bytes / 1e9
    results["limit_batch1_tok_s"] = results["copy_GBps"] * 1e9 / weight_bytes
    results["nucleus"] = {}
    for bs in batch_sizes:
        tok_s = nucleus_decode(llm, prompts[:bs], args.new_tokens, args.repeats)
        results["nucleus"][bs] = {"tok_s": tok_s}
        print(f"nucleus batch {bs}: {tok_s:.1f} tok/s", flush=True)
        save()
    if args.profile:
        results["nucleus_profile_batch1"] = nucleus_profile(llm, prompts[0])
    work = throughput_workloads()
    if args.throughput:
        llm.generate(work["mix512"][0][:16], SamplingParams(max_tokens=8, temperature=0))  # warm-up
        results["throughput"] = {}
        for name, (ps, outs) in work.items():
            repeats = 2 if name == "256x128/256" else 1
            results["throughput"][name] = nucleus_throughput(
                llm, ps, outs, repeats, timeline=args.timeline
            )
            print(f"nucleus {name}: {results['throughput'][name]}", flush=True)
            save()
        if args.timeline:  # the mix again, admitting whenever a slot is free (the CPU policy)
            scheduler = llm.engine.scheduler
            group, wait = scheduler.admit_group, scheduler.admit_max_wait
            scheduler.admit_group, scheduler.admit_max_wait = 1, 0
            results["throughput"]["mix512, admit at once"] = nucleus_throughput(
                llm, *work["mix512"], 1, timeline=True
            )
            scheduler.admit_group, scheduler.admit_max_wait = group, wait
            save()
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    if args.transformers:
        ps, outs = work["256x128/256"]
        results["transformers_cb"] = transformers_continuous_batching(ps, outs[0])
        print(f"transformers generate_batch 256x128/256: {results['transformers_cb']}", flush=True)
        save()
        gc.collect()
        torch.cuda.empty_cache()

    if args.gpt_fast is not None:
        results["gpt_fast"] = gpt_fast_decode(
            args.gpt_fast, batch_sizes, args.prompt_len, args.new_tokens
        )

    save()
    limit = results["limit_batch1_tok_s"]
    print(f"\ncopy {results['copy_GBps']:.0f} GB/s, bf16 {results['bf16_matmul_TFLOPs']:.0f} TFLOP/s,"
          f" weights {results['weight_GB']:.2f} GB, batch-1 limit {limit:.1f} tok/s")  # fmt: skip
    print("| batch | nucleus tok/s | gpt-fast tok/s | ratio | nucleus / limit (batch 1) |")
    print("|---|---|---|---|---|")
    for bs in batch_sizes:
        ours = results["nucleus"][bs]["tok_s"]
        peer = results.get("gpt_fast", {}).get(bs, {}).get("tok_s")
        ratio = f"{ours / peer:.2f}x" if peer else "-"
        frac = f"{ours / limit:.0%}" if bs == 1 else "-"
        print(f"| {bs} | {ours:.1f} | {peer or 0:.1f} | {ratio} | {frac} |")
    for name, row in results.get("throughput", {}).items():
        peer = results.get("transformers_cb", {}).get("tok_s") if name == "256x128/256" else None
        vs = f", {row['output_tok_s'] / peer:.1f}x transformers CB ({peer:.0f})" if peer else ""
        print(f"throughput {name}: {row['output_tok_s']:.0f} output tok/s "
              f"({row['total_tok_s']:.0f} prompt + output){vs}")  # fmt: skip
    for row in results.get("nucleus_profile_batch1", [])[:15]:
        print(f"{row['us_per_step']:9.1f} us/step  x{row['calls']:<6} {row['kernel']}")


if __name__ == "__main__":
    main()
