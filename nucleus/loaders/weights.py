"""`Weights`: a checkpoint's tensors by name, and each tensor-parallel rank's piece of them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from nucleus.distributed.layers import Slot
from nucleus.loaders.errors import CheckpointError


class Weights(Mapping[str, torch.Tensor]):
    """Full tensors in Meta's names (memory-mapped where the format allows). `local` gives a
    rank its piece, cut from the full tensor by the model's split table; formats stored in
    pieces (Meta's model-parallel shards, `meta.MetaShards`) override it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self, rank: int, world_size: int) -> set[str]:
        """The tensor names that rank `rank` reads (all of them, unless the format is sharded)."""
        return set(self)

    def local(self, name: str, slot: Slot, rank: int, world_size: int) -> torch.Tensor:
        """Rank `rank`'s piece of tensor `name`, which the model needs as `slot` says."""
        full = self[name]
        if tuple(full.shape) != slot.shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(full.shape)}, "
                f"the model config needs {slot.shape}"
            )
        # Contiguous: a row-parallel piece is a strided slice of columns.
        return slot.split.shard(full, rank, world_size).contiguous()
