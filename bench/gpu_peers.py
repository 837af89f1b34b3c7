"""The peers `bench/gpu.py` runs in its own process: gpt-fast and transformers' continuous batching.

Each builds its own Llama-3-8B-shaped model with random bf16 weights on the CUDA device and is
timed the way nucleus is (wall time of the whole call, the device synchronised around it, after a
warm-up or compile run).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch


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


def transformers_continuous_batching(
    prompts: list[list[int]], new_tokens: int, *, repeats: int = 1
) -> dict:
    """transformers' `generate_batch` (continuous batching over its paged cache, SDPA attention)
    on `LlamaForCausalLM` with Llama-3-8B shapes: output tok/s, greedy, a fixed output length
    (EOS never ends a request)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

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
    cfg._attn_implementation = "paged|sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    generation = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip

    def run(batch: list[list[int]]) -> None:
        # No inference_mode here: generate_batch updates its tensors from its own thread.
        model.generate_batch(batch, generation_config=generation, progress_bar=False)

    run(prompts[:8])  # warm-up
    seconds = timed(lambda: run(prompts), repeats=repeats)
    return {"tok_s": len(prompts) * new_tokens / seconds, "seconds": seconds}
