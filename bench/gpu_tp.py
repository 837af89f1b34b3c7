"""Tensor parallelism over N GPUs of one host (`python bench/gpu.py --tp N`): each part in a process
of its own, so that every `LLM` starts on clean devices; writes `gpu_tp.json` into `--out`.

1. all-reduces inside CUDA graphs, NCCL against the one-shot kernel over symmetric memory, per
   message size (16 KB is one decode token of Llama-3-70B; `docs/tensor-parallel.md`);
2. greedy tokens of an fp32 model that fits one GPU (8 KV heads, and 1 KV head) with N ranks
   against one: they must be identical;
3. Llama-3-8B shape, random bf16, batch-1 decode (as `gpu.py`: 128-token prompts, 256 new
   tokens, tok/s over the `generate` call, best of `--repeats`) with 1 rank and with N (one-shot
   all-reduce on, and NCCL only);
4. Llama-3-70B shape, random bf16 weights made on each device, N ranks: batch-1 decode, and
   256 requests of 128 prompt / 256 output tokens at once (output tok/s, as `gpu.py
   --throughput`).
Run: `python bench/gpu.py --tp 2 --out DIR` (`--parts` picks some of allreduce,check,8b,70b).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nucleus.distributed.group import MULTICAST_OFF

for _name, _value in MULTICAST_OFF.items():  # this host's GPUs must never see NVLink multicast
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from gpu import (  # noqa: E402
    LLAMA3_8B,
    measure_ceilings,
    nucleus_decode,
    nucleus_throughput,
    random_shard,
    throughput_workloads,
)

from nucleus.distributed import TensorParallel, checkpoint_layout  # noqa: E402
from nucleus.llm import LLM  # noqa: E402
from nucleus.model import Transformer  # noqa: E402
from nucleus.sampling_params import SamplingParams  # noqa: E402
from nucleus.tokenizer import Tokenizer  # noqa: E402

LLAMA3_70B = LLAMA3_8B | {
    "dim": 8192, "n_layers": 80, "n_heads": 64, "multiple_of": 4096,
}  # fmt: skip
# Small fp32 models for the greedy check: Llama 3's 8 KV heads, and one KV head for every rank.
CHECK_8KV = LLAMA3_8B | {"dim": 1024, "n_layers": 4, "n_heads": 16, "multiple_of": 256}
CHECK_1KV = CHECK_8KV | {"dim": 512, "n_heads": 8, "n_kv_heads": 1}
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "check-8kv": CHECK_8KV, "check-1kv": CHECK_1KV}


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
    """Batch-1 decode tok/s of `LLM` over random bf16 weights, and with `throughput` the 256 x
    (128 in / 256 out) workload of `gpu.py --throughput`."""
    if not cfg.get("one_shot", True):
        os.environ["NUCLEUS_ONE_SHOT_ALL_REDUCE"] = "0"  # read when the group forms (workers too)
    prompt_len, new, big = cfg["prompt_len"], cfg["new_tokens"], cfg.get("throughput", False)
    start = time.perf_counter()
    llm = tp_llm(
        cfg["shape"], torch.bfloat16, cfg["world"], tokenizer, cfg,
        max_num_seqs=256 if big else 1, max_model_len=prompt_len + new + 64,
    )  # fmt: skip
    out = {"build_s": time.perf_counter() - start, "one_shot": llm.model.tp.one_shot is not None}
    with torch.device("meta"):
        layout = checkpoint_layout(Transformer(llm.model.config))
    out["weight_GB"] = sum(torch.Size(s.shape).numel() for s in layout.values()) * 2 / 1e9
    prompt = torch.randint(0, 128000, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    out["tok_s"] = {"1": nucleus_decode(llm, prompt.tolist(), new, cfg["repeats"])}
    print(f"{cfg['shape']} TP={cfg['world']} batch 1: {out['tok_s']['1']:.1f} tok/s", flush=True)
    if big:
        prompts, outs = throughput_workloads()["256x128/256"]
        row = nucleus_throughput(llm, prompts, outs, 1, timeline=False)
        out["throughput_256x128/256"] = row
        print(f"{cfg['shape']} TP={cfg['world']} 256 x (128/256): {row}", flush=True)
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
        decode = {"kind": "decode", "shape": "8b"}
        plan.append(("8b_tp1", decode | {"world": 1}, 180))
        plan.append((f"8b_tp{world}", decode, 240))
        plan.append((f"8b_tp{world}_nccl_only", decode | {"one_shot": False}, 240))
    if "70b" in parts:
        plan.append((f"70b_tp{world}", {"kind": "decode", "shape": "70b", "throughput": True},
                     480))  # fmt: skip
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
    print("| run | ranks | batch-1 tok/s | limit: copy x ranks / weights | of limit |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        if not (isinstance(row, dict) and "tok_s" in row):
            continue
        ranks = 1 if name.endswith("tp1") else world
        limit = copy * ranks / row["weight_GB"]
        tok_s = row["tok_s"]["1"]
        print(f"| {name} | {ranks} | {tok_s:.1f} | {limit:.1f} | {tok_s / limit:.0%} |")
        if "throughput_256x128/256" in row:
            big = row["throughput_256x128/256"]
            print(f"{name}: 256 x (128 in / 256 out): {big['output_tok_s']:.0f} output tok/s "
                  f"({big['total_tok_s']:.0f} prompt + output)")  # fmt: skip
    one = results.get("8b_tp1", {}).get("tok_s", {}).get("1")
    two = results.get(f"8b_tp{world}", {}).get("tok_s", {}).get("1")
    if one and two:
        print(f"8B batch 1: TP={world} / TP=1 = {two / one:.2f}x (target >= 1.3x)")
    big = results.get(f"70b_tp{world}", {}).get("tok_s", {}).get("1")
    if big:
        print(f"70B batch 1, TP={world}: {big:.1f} tok/s (target >= 42)")


def main() -> None:
    """The child processes' entry (`run_child`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", required=True)
    child_main(json.loads(parser.parse_args().child))


if __name__ == "__main__":
    main()
