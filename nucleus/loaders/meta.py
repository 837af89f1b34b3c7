"""Meta checkpoints: `params.json` and `consolidated.*.pth`, model-parallel shards merged."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nucleus.config import ConfigError, ModelConfig
from nucleus.loaders.errors import CheckpointError

# How fairscale split each weight across model-parallel ranks (reference-semantics 1.4):
# column-parallel weights are cut along dim 0, row-parallel along dim 1, norms are replicated.
_SPLIT_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
}


def _split_dim(name: str) -> int | None:
    for part in reversed(name.split(".")[:-1]):
        if part in _SPLIT_DIM:
            return _SPLIT_DIM[part]
    return None


def meta_checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """Every `*.pth` of the directory, in lexicographic order, as the reference globs them."""
    return sorted(ckpt_dir.glob("*.pth"))


def load_meta_params(ckpt_dir: Path) -> ModelConfig:
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no params.json (not a Meta checkpoint directory)")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return ModelConfig.from_meta_params(params)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None


def load_meta_checkpoint(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and merged weights of a Meta checkpoint directory (memory-mapped, no pickle code)."""
    ckpt_dir = Path(ckpt_dir)
    config = load_meta_params(ckpt_dir)
    files = meta_checkpoint_files(ckpt_dir)
    if not files:
        raise CheckpointError(f"no checkpoint files (*.pth) found in {ckpt_dir}")
    shards = []
    for path in files:
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch raises several types for corrupt or unsafe files
            raise CheckpointError(f"{path}: not a weights-only checkpoint ({e})") from None
        if not isinstance(shards[-1], dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(shards[-1]).__name__}")
    if len(shards) == 1:
        return config, shards[0]
    names = set(shards[0])
    for path, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != names:
            raise CheckpointError(f"{path}: holds different tensor names than {files[0]}")
    merged = {}
    for name in shards[0]:
        dim = _split_dim(name)
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return config, merged


def is_meta_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()
