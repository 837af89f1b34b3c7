"""Meta checkpoints: `params.json` and `consolidated.*.pth`, model-parallel shards merged or
read rank by rank."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nucleus.config import ConfigError, ModelConfig
from nucleus.distributed.layers import Slot, checkpoint_layout
from nucleus.loaders.errors import CheckpointError
from nucleus.loaders.weights import Weights
from nucleus.model import Transformer


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


class MetaShards(Weights):
    """The tensors of Meta's model-parallel shards (`consolidated.00.pth`, ...: one file per rank,
    as fairscale split them), memory-mapped.

    With as many ranks as files, rank `r`'s pieces are read straight from file `r` (the others
    are only opened, to check their names); with any other number, every tensor is merged from
    the files (`__getitem__`) and cut again for the rank. Both directions read the model's split
    table (`nucleus.distributed.checkpoint_layout`): splitting, merging and re-sharding are the
    same table.
    """

    def __init__(
        self, files: list[Path], shards: list[dict[str, torch.Tensor]], layout: dict[str, Slot]
    ) -> None:
        super().__init__(shards[0])
        self.files = files
        self.shards = shards
        self.layout = layout

    def __getitem__(self, name: str) -> torch.Tensor:
        pieces = [shard[name] for shard in self.shards]
        slot = self.layout.get(name)
        return pieces[0] if slot is None else slot.split.merge(pieces)

    def names(self, rank: int, world_size: int) -> set[str]:
        return set(self.shards[rank] if self._direct(world_size) else self.shards[0])

    def local(self, name: str, slot: Slot, rank: int, world_size: int) -> torch.Tensor:
        if not self._direct(world_size):
            return super().local(name, slot, rank, world_size)
        piece = self.shards[rank][name]
        need = slot.split.local_shape(slot.shape, world_size)
        if tuple(piece.shape) != need:
            raise CheckpointError(
                f"{self.files[rank]}: tensor {name!r} has shape {tuple(piece.shape)}, rank "
                f"{rank} of {world_size} needs {need}"
            )
        return piece

    def _direct(self, world_size: int) -> bool:
        return len(self.shards) == world_size > 1


def load_meta_checkpoint(ckpt_dir: str | Path) -> tuple[ModelConfig, Weights]:
    """Config and weights of a Meta checkpoint directory (memory-mapped, no pickle code); the
    weights of several shards are a `MetaShards`."""
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
        return config, Weights(shards[0])
    names = set(shards[0])
    for path, shard in zip(files[1:], shards[1:], strict=True):
        if set(shard) != names:
            raise CheckpointError(f"{path}: holds different tensor names than {files[0]}")
    with torch.device("meta"):
        layout = checkpoint_layout(Transformer(config))
    return config, MetaShards(files, shards, layout)


def is_meta_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()
