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
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from nucleus.config import ModelConfig
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.llm import LLM
from nucleus.loaders import build_transformer
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


def random_weights(params: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Meta-named random weights for `params` (norms 1, matrices N(0, 0.02))."""
    from nucleus.linear import Linear
    from nucleus.model import Transformer

    config = ModelConfig.from_meta_params(params)
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {}
    for name, p in model.state_dict().items():
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
        if isinstance(module, Linear):
            for part, width in module.checkpoint_names(name.rpartition(".")[0]).items():
                shapes[part] = (width, module.in_features)
        else:
            shapes[name] = tuple(p.shape)
    if config.tie_embeddings:
        shapes.pop("output.weight", None)
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
            weights[name] = w.to(dtype)
    return weights


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
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    engine.add_request("profile", prompt, params, stream=False)
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
    args = parser.parse_args()
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
