"""First GPU reading of the engine (torch attention backend, no custom kernels) beside `transformers`.

Llama-3-8B shapes, random bf16 weights (speed does not depend on the values), on one CUDA device:
- the two ceilings, measured here: device-to-device copy bandwidth and a bf16 matrix product;
- nucleus batch-1 decode (128-token prompt, 256 new tokens) and a 256-request throughput run;
- `transformers` `LlamaForCausalLM` on the same shapes in the same process: eager `generate`
  at batch 1 and batch 64;
- correctness: greedy outputs of a small fp32 model equal on CUDA and on the CPU.

Run: `python bench/gpu_baseline.py --tokenizer PATH/tokenizer.model [--out DIR]`.
Prints a table; writes `gpu_baseline.json` into `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from nucleus.config import ModelConfig
from nucleus.engine.engine import EngineConfig, LLMEngine
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


def measure_ceilings() -> dict[str, float]:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
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
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": tflops}


def random_model(params: dict, dtype: torch.dtype, device: str):
    """The nucleus Transformer with random weights, made directly on the device."""
    config = ModelConfig.from_meta_params(params)
    with torch.device("meta"):
        from nucleus.model import Transformer

        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            weights[name] = (
                torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
            ).to(dtype)
    return build_transformer(config, weights, device=device, dtype=dtype)


def run_engine(model, tokenizer, prompts, max_tokens, **options) -> tuple[float, list[list[int]]]:
    engine = LLMEngine(model, tokenizer, EngineConfig(**options))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    torch.cuda.synchronize() if model.lm_head_weight.is_cuda else None
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    if model.lm_head_weight.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del engine
    return elapsed, [o.outputs[0].token_ids for o in outs]


def transformers_generate(prompts: torch.Tensor, max_new: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = prompts.cuda()
    kwargs = {"do_sample": False, "min_new_tokens": max_new, "max_new_tokens": max_new}
    model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(args.tokenizer)
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    results |= measure_ceilings()
    print(results, flush=True)

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 128000, (args.requests, args.prompt_len), generator=g)
    prompt_lists = prompts.tolist()
    weight_bytes = None

    model = random_model(LLAMA3_8B, torch.bfloat16, "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["weight_GB"] = weight_bytes / 1e9
    results["limit_batch1_tok_s"] = results["copy_GBps"] * 1e9 / weight_bytes
    t, _ = run_engine(model, tokenizer, prompt_lists[:1], args.new_tokens, num_kv_blocks=2048)
    results["nucleus_batch1_tok_s"] = args.new_tokens / t
    print("nucleus batch 1:", results["nucleus_batch1_tok_s"], flush=True)
    blocks = args.requests * -(-(args.prompt_len + args.new_tokens) // 16) + 64
    t, _ = run_engine(
        model,
        tokenizer,
        prompt_lists,
        args.new_tokens,
        num_kv_blocks=blocks,
        max_num_seqs=args.requests,
        max_num_batched_tokens=8192,
    )
    results[f"nucleus_{args.requests}_requests_tok_s"] = args.requests * args.new_tokens / t
    print("nucleus throughput:", results[f"nucleus_{args.requests}_requests_tok_s"], flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()

    t = transformers_generate(prompts[:1], args.new_tokens)
    results["transformers_eager_batch1_tok_s"] = args.new_tokens / t
    t = transformers_generate(prompts[:64], args.new_tokens)
    results["transformers_eager_batch64_tok_s"] = 64 * args.new_tokens / t
    gc.collect()
    torch.cuda.empty_cache()

    # Correctness: greedy outputs equal on CUDA and CPU in fp32 (small model, real Llama 3 vocab).
    small = {**LLAMA3_8B, "dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2}
    small_prompts = [p[: 5 + 7 * i] for i, p in enumerate(prompt_lists[:8])]
    cpu_model = random_model(small, torch.float32, "cuda").to("cpu")
    cuda_model = random_model(small, torch.float32, "cuda")
    _, cpu_tokens = run_engine(
        cpu_model, tokenizer, small_prompts, 32, num_kv_blocks=256, max_model_len=512
    )
    _, cuda_tokens = run_engine(
        cuda_model, tokenizer, small_prompts, 32, num_kv_blocks=256, max_model_len=512
    )
    results["greedy_fp32_cuda_equals_cpu"] = cpu_tokens == cuda_tokens
    results["greedy_fp32_rows_equal"] = sum(
        a == b for a, b in zip(cpu_tokens, cuda_tokens, strict=True)
    )

    (out_dir / "gpu_baseline.json").write_text(json.dumps(results, indent=2))
    print("\n| measure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value:.1f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
