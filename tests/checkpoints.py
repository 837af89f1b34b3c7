"""Random-weight Llama 3 checkpoints in every format nucleus reads, and their `transformers` twin.

Shapes are real Llama 3 ones where it matters (vocabulary 128,256, GQA, RoPE theta 500,000, Llama 3.1
RoPE scaling) and small elsewhere, so tests stay fast. The `transformers` model built from the same
weights is the oracle: nucleus code never builds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 128256


@dataclass(frozen=True)
class Shape:
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 384
    scaled_rope: bool = False  # Llama 3.1
    rope_factor: float = 8.0
    tied: bool = False  # Llama 3.2 1B/3B
    vocab_size: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def meta_params(self) -> dict:
        # multiple_of/ffn_dim_multiplier chosen so Meta's formula gives ffn_hidden exactly.
        params = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.ffn_hidden,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "rope_theta": 500000.0,
        }
        if self.scaled_rope:
            params["use_scaled_rope"] = True
        return params

    def hf_config(self):
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": 500000.0}
        if self.scaled_rope:
            rope = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": self.rope_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.ffn_hidden,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=rope,
            max_position_embeddings=131072 if self.scaled_rope else 8192,
            tie_word_embeddings=self.tied,
            bos_token_id=128000,
            eos_token_id=128001,
            torch_dtype="float32",
        )


LLAMA3 = Shape()
LLAMA31 = Shape(scaled_rope=True)
LLAMA32 = Shape(scaled_rope=True, rope_factor=32.0, tied=True)
# For tensor parallelism: Llama 3's 8 KV heads, and one KV head (fewer than the ranks).
GQA8 = Shape(dim=256, n_heads=16, n_kv_heads=8, ffn_hidden=768)
KV1 = Shape(dim=128, n_heads=4, n_kv_heads=1, ffn_hidden=384)


def random_meta_weights(
    shape: Shape, seed: int, logit_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Meta-named weights; `logit_scale` sharpens the output distribution (peaked sampling tests)."""
    g = torch.Generator().manual_seed(seed)

    def w(*size: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    hd = shape.head_dim
    weights = {
        "tok_embeddings.weight": w(shape.vocab_size, shape.dim, std=1.0),
        "norm.weight": 1 + w(shape.dim),
    }
    if not shape.tied:
        weights["output.weight"] = w(shape.vocab_size, shape.dim) * logit_scale
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        weights |= {
            p + "attention.wq.weight": w(shape.n_heads * hd, shape.dim),
            p + "attention.wk.weight": w(shape.n_kv_heads * hd, shape.dim),
            p + "attention.wv.weight": w(shape.n_kv_heads * hd, shape.dim),
            p + "attention.wo.weight": w(shape.dim, shape.n_heads * hd),
            p + "feed_forward.w1.weight": w(shape.ffn_hidden, shape.dim),
            p + "feed_forward.w2.weight": w(shape.dim, shape.ffn_hidden),
            p + "feed_forward.w3.weight": w(shape.ffn_hidden, shape.dim),
            p + "attention_norm.weight": 1 + w(shape.dim),
            p + "ffn_norm.weight": 1 + w(shape.dim),
        }
    return weights


def write_meta_checkpoint(
    path: Path, shape: Shape, weights: dict[str, torch.Tensor], shards: int = 1
) -> Path:
    """`params.json` + `consolidated.NN.pth`, split across `shards` files as fairscale splits them
    (with more shards than KV heads, each KV head's rows repeated first, as llama-models does)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(shape.meta_params()))
    row_parallel = ("attention.wo", "feed_forward.w2")
    replicated = ("norm",)
    for r in range(shards):
        shard = {}
        for name, tensor in weights.items():
            if name.rsplit(".", 2)[-2].endswith(replicated) or shards == 1:
                shard[name] = tensor.clone()
                continue
            dim = 1 if any(k in name for k in row_parallel) else 0
            if name.endswith(("wk.weight", "wv.weight")) and shards > shape.n_kv_heads:
                heads = tensor.view(shape.n_kv_heads, -1, shape.dim)
                tensor = heads.repeat_interleave(shards // shape.n_kv_heads, 0).flatten(0, 1)
            shard[name] = tensor.chunk(shards, dim=dim)[r].clone()
        torch.save(shard, path / f"consolidated.{r:02d}.pth")
    return path


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF Q/K rows, as `convert_llama_weights_to_hf.py` in transformers writes it."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_state_dict(shape: Shape, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    out = {
        "model.embed_tokens.weight": weights["tok_embeddings.weight"],
        "model.norm.weight": weights["norm.weight"],
        "lm_head.weight": weights.get("output.weight", weights["tok_embeddings.weight"]),
    }
    for name, tensor in weights.items():
        if not name.startswith("layers."):
            continue
        parts = name.split(".")
        layer, module = parts[1], ".".join(parts[2:-1])
        if module == "attention.wq":
            tensor = hf_permute(tensor, shape.n_heads)
        elif module == "attention.wk":
            tensor = hf_permute(tensor, shape.n_kv_heads)
        out[f"model.layers.{layer}.{names[module]}.weight"] = tensor
    return out


def hf_model(shape: Shape, weights: dict[str, torch.Tensor]):
    """The `transformers` LlamaForCausalLM holding the same weights (float32, eval)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(shape.hf_config()).float().eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(shape, weights), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Oracle logits `(len(ids), V)` for one sequence, float32."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
