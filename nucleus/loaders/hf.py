"""Hugging Face directories: `config.json` and `model.safetensors` (or a sharded index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from nucleus.config import ConfigError, ModelConfig
from nucleus.loaders.errors import CheckpointError

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def meta_name(hf_name: str) -> str | None:
    """The Meta name of a `LlamaForCausalLM` weight, or None for one the model does not use."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in _LAYER_NAMES:
            return f"layers.{parts[2]}.{_LAYER_NAMES[module]}.{parts[-1]}"
    return None


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's Q/K row permutation: HF row `c*hd/2 + i` holds Meta row `2i + c` of each head."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def load_hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in architectures:
        raise CheckpointError(
            f"{path}: model_type {config.get('model_type')!r} / {architectures} is not a "
            "Llama-architecture model (LlamaForCausalLM)"
        )
    try:
        return ModelConfig.from_hf_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{model_dir}: {e}") from None


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise CheckpointError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json found"
        )
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the index but missing")
    return files


def load_hf_checkpoint(model_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights of a `LlamaForCausalLM` directory, renamed and re-ordered for nucleus.

    Tensors are memory-mapped by safetensors; only Q/K rows are re-ordered (a view when possible).
    """
    model_dir = Path(model_dir)
    config = load_hf_config(model_dir)
    weights: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    name = meta_name(hf_name)
                    if name is None:
                        if hf_name.endswith("rotary_emb.inv_freq"):
                            continue  # older checkpoints store the RoPE table; it is recomputed
                        raise CheckpointError(f"{path}: unexpected tensor {hf_name!r}")
                    tensor = f.get_tensor(hf_name)
                    if name.endswith("attention.wq.weight"):
                        tensor = rotate_half_to_interleaved(tensor, config.n_heads)
                    elif name.endswith("attention.wk.weight"):
                        tensor = rotate_half_to_interleaved(tensor, config.n_kv_heads)
                    weights[name] = tensor
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
    if config.tie_embeddings:
        weights.pop("output.weight", None)
    return config, weights
