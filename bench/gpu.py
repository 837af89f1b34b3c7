"""GPU decode speed of nucleus beside gpt-fast, in one process on one CUDA device.

Llama-3-8B shapes with random bf16 weights (speed does not depend on the values):
1. the ceilings, measured here: device-to-device copy bandwidth (bytes read + written) and a
   bf16 8192^3 matrix product;
2. nucleus through `LLM` (the engine: Triton kernels, CUDA graphs) at each batch size: 128-token
   prompts, 256 new tokens each, greedy, EOS ignored; tok/s = new tokens / wall time of the
   `generate` call (prefill included), best of `--repeats`;
3. the peer, gpt-fast (`decode_one_token` compiled with `mode="reduce-overhead"`, its own
   `generate` on the same prompt shape, timed the same way after its compile run), when its files
   are given (`--gpt-fast DIR` holding its `model.py`, `generate.py`, `tokenizer.py`);
4. optionally (`--profile`) the CUDA time of one decode step of nucleus by kernel.

The memory limit at batch 1 is the copy bandwidth over the weight bytes read per token.
Run: `python bench/gpu.py --gpt-fast .carry/gpt-fast --out DIR`. Prints a table; writes
`gpu.json` into `--out`.

With `--tp N` (tensor parallelism over N GPUs of one host) it measures instead, each part in a
process of its own (so that every `LLM` starts on clean devices), and writes `gpu_tp.json`:
1. all-reduces inside CUDA graphs, NCCL against the one-shot kernel over symmetric memory, per
   message size (16 KB is one decode token of Llama-3-70B);
2. greedy tokens of an fp32 model that fits one GPU (8 KV heads, and 1 KV head) with N ranks
   against one: they must be identical;
3. Llama-3-8B shape, random bf16, batch-1 decode with 1 rank and with N (one-shot all-reduce on,
   and NCCL only): tok/s as above;
4. Llama-3-70B shape, random bf16 weights made on each device, N ranks: batch-1 decode, and
   256 requests of 128 prompt tokens and 256 new ones at once (output tok/s over the wall time).
Run: `python bench/gpu.py --tp 2 --out docs/results` (`--parts` picks some of
allreduce,check,8b,70b).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from nucleus.config import ModelConfig
from nucleus.distributed import TensorParallel, checkpoint_layout
from nucleus.distributed.group import MULTICAST_OFF
from nucleus.distributed.layers import Slot
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.llm import LLM
from nucleus.loaders import Weights, build_transformer
from nucleus.model import Transformer
from nucleus.sampling_params import SamplingParams
from nucleus.tokenizer import Tokenizer

for _name, _value in MULTICAST_OFF.items():  # this host's GPUs must never see NVLink multicast
    os.environ.setdefault(_name, _value)

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
LLAMA3_70B = LLAMA3_8B | {
    "dim": 8192, "n_layers": 80, "n_heads": 64, "multiple_of": 4096,
}  # fmt: skip
# Small fp32 models for the greedy check: Llama 3's 8 KV heads, and one KV head for every rank.
CHECK_8KV = LLAMA3_8B | {"dim": 1024, "n_layers": 4, "n_heads": 16, "multiple_of": 256}
CHECK_1KV = CHECK_8KV | {"dim": 512, "n_heads": 8, "n_kv_heads": 1}
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "check-8kv": CHECK_8KV, "check-1kv": CHECK_1KV}


def timed(fn, *, repeats: int = 1) -> float:
    """Best wall time of `fn()` over `repeats` runs, the device synchronised around each."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


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
    seconds = timed(lambda: llm.generate(prompts, params), repeats=repeats)
    return len(prompts) * new_tokens / seconds


def nucleus_profile(llm: LLM, prompt: list[int], steps: int = 20) -> list[dict]:
    """CUDA time per kernel over `steps` decode steps (graph replays included), largest first."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    engine.add_request("profile", prompt, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    engine.step()  # the prefill
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    rows = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if cuda_us > 0:
            rows.append(
                {"kernel": evt.key[:90], "us_per_step": cuda_us / steps, "calls": evt.count}
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:25]


def gpt_fast_decode(path: Path, batch_sizes: list[int], prompt_len: int, new_tokens: int) -> dict:
    """gpt-fast's own `generate` with random bf16 Llama-3-8B weights: tok/s per batch size."""
    sys.path.insert(0, str(path))
    gen = importlib.import_module("generate")
    gf_model = importlib.import_module("model")
    with torch.device("meta"):
        model = gf_model.Transformer.from_name("llama-3-8b")
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("attention_norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.02)
    model.eval()
    gen.decode_one_token = torch.compile(
        gen.decode_one_token, mode="reduce-overhead", fullgraph=True
    )
    prompt = torch.randint(0, 128000, (prompt_len,), device="cuda", dtype=torch.int)
    results = {}
    for bs in batch_sizes:

        def run(bs=bs):
            with torch.inference_mode():
                gen.generate(
                    model, prompt, new_tokens, batch_size=bs, interactive=False,
                    draft_model=None, temperature=1.0, top_k=None,
                )  # fmt: skip

        start = time.perf_counter()
        run()  # the compile
        compile_s = time.perf_counter() - start
        seconds = timed(run, repeats=2)
        results[bs] = {"tok_s": bs * new_tokens / seconds, "compile_s": compile_s}
        print(f"gpt-fast batch {bs}: {results[bs]['tok_s']:.1f} tok/s", flush=True)
    return results


# ---- tensor parallelism (--tp N): each part in a child process -----------------------------------
ALL_REDUCE_BYTES = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
ALL_REDUCES_PER_GRAPH = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the all-reduce measurement: per size, one CUDA graph of 50 NCCL all-reduces
    and one of 50 one-shot ones, replayed; us per all-reduce. Also checks the one-shot sum."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, wait_for_workers=False)
    tp = TensorParallel(rank, world, torch.device("cuda", rank))
    tp.join(store)
    rows = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for nbytes in ALL_REDUCE_BYTES:
        x = torch.full((nbytes // 2,), 1e-3, dtype=torch.bfloat16, device=tp.device)
        ops = {"nccl": lambda x=x: dist.all_reduce(x)}
        if tp.one_shot is not None and tp.one_shot.fits(x):
            ops["one_shot"] = lambda x=x: tp.one_shot(x)
        row = {"bytes": nbytes}
        for name, op in ops.items():
            op()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(ALL_REDUCES_PER_GRAPH):
                    op()
            graph.replay()
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            end.synchronize()
            row[f"{name}_us"] = start.elapsed_time(end) * 1e3 / (5 * ALL_REDUCES_PER_GRAPH)
        rows.append(row)
    a = torch.randn(4096, generator=torch.Generator().manual_seed(rank)).to(tp.device)
    check = {"one_shot": tp.one_shot is not None}
    if tp.one_shot is not None:
        summed = tp.one_shot(a)
        dist.all_reduce(a)
        check["max_abs_diff_vs_nccl"] = (summed - a).abs().max().item()
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows, **check}))
    tp.leave()


def child_all_reduce(cfg: dict) -> dict:
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "all_reduce.json"
        tmp.spawn(all_reduce_rank, args=(cfg["world"], free_port(), str(out)), nprocs=cfg["world"])
        return json.loads(out.read_text())


def tp_llm(shape: str, dtype: torch.dtype, world: int, tokenizer, cfg: dict, **options) -> LLM:
    build = functools.partial(random_shard, SHAPES[shape], dtype, 0)
    return LLM.from_builder(
        build, tokenizer, device="cuda", tensor_parallel_size=world, name=shape,
        enforce_eager=cfg.get("enforce_eager", False), **options,
    )  # fmt: skip


def child_check(cfg: dict, tokenizer) -> dict:
    """Greedy tokens of a small fp32 model with `world` ranks and with one, CUDA graphs on."""
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, 128000, (8, 64), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = []
    for world in (1, cfg["world"]):
        llm = tp_llm(cfg["shape"], torch.float32, world, tokenizer, cfg, max_num_seqs=8,
                     max_model_len=160)  # fmt: skip
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    equal = sum(a == b for a, b in zip(*tokens, strict=True))
    print(f"greedy {cfg['shape']}: {equal}/{len(prompts)} rows equal", flush=True)
    return {"rows_equal": equal, "rows": len(prompts)}


def child_decode(cfg: dict, tokenizer) -> dict:
    """tok/s of `LLM` over random bf16 weights at each batch size (prefill included)."""
    if not cfg.get("one_shot", True):
        os.environ["NUCLEUS_ONE_SHOT_ALL_REDUCE"] = "0"  # read when the group forms (workers too)
    sizes, prompt_len, new = cfg["batch_sizes"], cfg["prompt_len"], cfg["new_tokens"]
    start = time.perf_counter()
    llm = tp_llm(
        cfg["shape"], torch.bfloat16, cfg["world"], tokenizer, cfg,
        max_num_seqs=max(sizes), max_model_len=prompt_len + new + 64,
    )  # fmt: skip
    out = {"build_s": time.perf_counter() - start, "one_shot": llm.model.tp.one_shot is not None}
    with torch.device("meta"):
        layout = checkpoint_layout(Transformer(llm.model.config))
    out["weight_GB"] = sum(torch.Size(s.shape).numel() for s in layout.values()) * 2 / 1e9
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 128000, (max(sizes), prompt_len), generator=g).tolist()
    out["tok_s"] = {}
    for bs in sizes:
        repeats = cfg["repeats"] if bs == 1 else 1
        out["tok_s"][bs] = nucleus_decode(llm, prompts[:bs], new, repeats)
        print(
            f"{cfg['shape']} TP={cfg['world']} batch {bs}: {out['tok_s'][bs]:.1f} tok/s", flush=True
        )
    llm.shutdown()
    return out


def run_child(cfg: dict, timeout: float) -> dict:
    """One part in a process of its own; its result, or what went wrong."""
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        print(f"{cfg}: timed out after {timeout:.0f} s\n{tail}", flush=True)
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
    result = next((line for line in reversed(lines) if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        return {"error": f"exit code {proc.returncode}", "log_tail": proc.stdout[-3000:]}
    return json.loads(result[len("RESULT ") :]) | {"wall_s": time.perf_counter() - start}


def child_main(cfg: dict) -> None:
    from nucleus.assets import asset_path

    tokenizer = Tokenizer(cfg.get("tokenizer") or asset_path("llama3-tokenizer"))
    kind = cfg["kind"]
    if kind == "all_reduce":
        result = child_all_reduce(cfg)
    elif kind == "check":
        result = child_check(cfg, tokenizer)
    else:
        result = child_decode(cfg, tokenizer)
    print("RESULT " + json.dumps(result), flush=True)


def tp_main(args: argparse.Namespace) -> None:
    world, parts = args.tp, set(args.parts.split(","))
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "devices": torch.cuda.device_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "tp": world,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "multicast_env": {k: os.environ.get(k) for k in MULTICAST_OFF},
    }
    results |= measure_ceilings()
    gc.collect()
    torch.cuda.empty_cache()
    out = args.out / "gpu_tp.json"
    common = {"tokenizer": args.tokenizer, "world": world, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "enforce_eager": args.enforce_eager}  # fmt: skip
    plan = []
    if "allreduce" in parts:
        plan.append(("all_reduce", {"kind": "all_reduce"}, 120))
    if "check" in parts:
        for shape in ("check-8kv", "check-1kv"):
            plan.append((f"greedy_{shape}", {"kind": "check", "shape": shape}, 180))
    if "8b" in parts:
        decode = {"kind": "decode", "shape": "8b", "batch_sizes": [1]}
        plan.append(("8b_tp1", decode | {"world": 1}, 180))
        plan.append((f"8b_tp{world}", decode, 240))
        plan.append((f"8b_tp{world}_nccl_only", decode | {"one_shot": False}, 240))
    if "70b" in parts:
        plan.append((f"70b_tp{world}", {"kind": "decode", "shape": "70b", "batch_sizes": [1, 256]},
                     420))  # fmt: skip
    for name, cfg, timeout in plan:
        print(f"--- {name}", flush=True)
        results[name] = run_child(common | cfg, timeout)
        out.write_text(json.dumps(results, indent=2))
    print_tp_table(results, world)


def print_tp_table(results: dict, world: int) -> None:
    copy = results["copy_GBps"]
    print(f"\ncopy {copy:.0f} GB/s per GPU, bf16 {results['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    if "rows" in results.get("all_reduce", {}):
        print("| all-reduce in a CUDA graph | NCCL us | one-shot us |\n|---|---|---|")
        for row in results["all_reduce"]["rows"]:
            one = row.get("one_shot_us")
            print(f"| {row['bytes'] >> 10} KB | {row['nccl_us']:.1f} | "
                  f"{'-' if one is None else f'{one:.1f}'} |")  # fmt: skip
    for name, row in results.items():
        if name.startswith("greedy_") and "rows" in row:
            print(f"{name}, TP={world} vs TP=1: {row['rows_equal']}/{row['rows']} rows equal")
    print("| model | ranks | batch | tok/s | limit (copy x ranks / weights) | of limit |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        if not (isinstance(row, dict) and "tok_s" in row):
            continue
        ranks = 1 if name.endswith("tp1") else world
        limit = copy * 1e9 * ranks / (row["weight_GB"] * 1e9)
        for bs, tok_s in row["tok_s"].items():
            frac = f"{tok_s / limit:.0%}" if str(bs) == "1" else "-"
            print(f"| {name} | {ranks} | {bs} | {tok_s:.1f} | {limit:.1f} | {frac} |")
    one = results.get("8b_tp1", {}).get("tok_s", {}).get("1")
    two = results.get(f"8b_tp{world}", {}).get("tok_s", {}).get("1")
    if one and two:
        print(f"8B batch 1: TP={world} / TP=1 = {two / one:.2f}x (target >= 1.3x)")
    big = results.get(f"70b_tp{world}", {}).get("tok_s", {}).get("1")
    if big:
        print(f"70B batch 1, TP={world}: {big:.1f} tok/s (target >= 42)")


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
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tp", type=int, default=0, help="measure tensor parallelism over N GPUs")
    parser.add_argument("--parts", default="allreduce,check,8b,70b", help="with --tp")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child_main(json.loads(args.child))
    if args.tp:
        args.out.mkdir(parents=True, exist_ok=True)
        return tp_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
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

    results["linear_bandwidth"] = linear_bandwidth()
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
        max_num_seqs=max(batch_sizes),
        max_model_len=args.prompt_len + args.new_tokens + 64,
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
    del llm
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
    for row in results.get("nucleus_profile_batch1", [])[:15]:
        print(f"{row['us_per_step']:9.1f} us/step  x{row['calls']:<6} {row['kernel']}")


if __name__ == "__main__":
    main()
