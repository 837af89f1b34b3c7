"""Write a Hugging Face checkpoint with random weights and real Llama 3 shapes, for benchmarks.

    python bench/random_checkpoint.py --shape llama-3-8b --out /tmp/llama3-8b-random

`config.json`, `model.safetensors` (bf16, N(0, 0.02); norms 1) and the Llama 3 `tokenizer.json`
(the pinned asset). Speed does not depend on the weights' values; the model's output is noise.
The weights are drawn on the GPU when there is one (fast), then written once.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama-3-8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "ffn": 14336},
    "llama-3.2-1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "ffn": 8192},
}
VOCAB = 128256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    s = SHAPES[args.shape]
    hd = s["hidden"] // s["heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": args.shape == "llama-3.2-1b",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }
    shapes = {
        "model.embed_tokens.weight": (VOCAB, s["hidden"]),
        "model.norm.weight": (s["hidden"],),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (VOCAB, s["hidden"])
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (s["heads"] * hd, s["hidden"]),
            p + "self_attn.k_proj.weight": (s["kv_heads"] * hd, s["hidden"]),
            p + "self_attn.v_proj.weight": (s["kv_heads"] * hd, s["hidden"]),
            p + "self_attn.o_proj.weight": (s["hidden"], s["heads"] * hd),
            p + "mlp.gate_proj.weight": (s["ffn"], s["hidden"]),
            p + "mlp.up_proj.weight": (s["ffn"], s["hidden"]),
            p + "mlp.down_proj.weight": (s["hidden"], s["ffn"]),
            p + "input_layernorm.weight": (s["hidden"],),
            p + "post_attention_layernorm.weight": (s["hidden"],),
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            w = torch.randn(shape, generator=g, device=device) * 0.02
            weights[name] = w.to(torch.bfloat16).cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    from nucleus.assets import asset_path

    shutil.copy(asset_path("llama3-tokenizer-json"), args.out / "tokenizer.json")
    print(f"wrote {args.out} ({sum(w.numel() for w in weights.values()) * 2 / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
