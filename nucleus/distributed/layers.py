"""The sharded layers of tensor parallelism, and the split table they carry.

Megatron's layout, which Meta's model-parallel checkpoints store (fairscale; reference-semantics
1.4), one piece per rank:
- `ColumnParallelLinear` (Q/K/V, gate/up, the LM head) holds a slice of each part's output rows:
  its products need no communication; the head's slices are gathered into full logits;
- `RowParallelLinear` (the attention output and down projections) holds the matching slice of its
  input columns: each rank's product is a partial sum, added up by one all-reduce;
- `VocabParallelEmbedding` holds a slice of the vocabulary's rows: ids outside it give zeros, and
  one all-reduce fills every row.

Each layer knows how every checkpoint tensor it holds is cut (a `Split`: along which dim, in how
many units: heads, or single rows). `checkpoint_layout` collects the table from a model; the
loaders read it one way or the other: a full tensor is sharded with it, Meta's shards are merged
with it, and re-sharding is both. Heads are never cut: Q heads and FFN rows are shared out
equally, and with fewer KV heads than ranks each rank holds the one KV head its Q heads use
(replicated), as Meta's `llama-models` re-shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nucleus.config import ConfigError, ModelConfig
from nucleus.distributed.group import TensorParallel
from nucleus.linear import Linear


class Heads(NamedTuple):
    """`count` heads of `size` rows (or columns) each: a width that is cut between heads only."""

    count: int
    size: int


def local_units(units: int, world_size: int) -> int:
    """How many of `units` one rank holds: an equal share, or one (replicated) when there are
    fewer units than ranks."""
    return units // world_size if units >= world_size else 1


@dataclass(frozen=True)
class Split:
    """How a checkpoint tensor is cut between ranks: along `dim`, in `units` equal units, rank `r`
    of `world` holding `local_units(units, world)` units from unit `r * units // world` on (the
    same formula for a share and for one replicated unit). `dim=None`: every rank holds it all."""

    dim: int | None
    units: int = 1

    def shard(self, full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """Rank `rank`'s piece of the full tensor (a view)."""
        if self.dim is None or world_size == 1:
            return full
        unit = full.shape[self.dim] // self.units
        first = rank * self.units // world_size
        return full.narrow(self.dim, first * unit, local_units(self.units, world_size) * unit)

    def merge(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order (a replicated unit once)."""
        if self.dim is None or len(shards) == 1:
            return shards[0]
        replicas = max(len(shards) // self.units, 1)
        return torch.cat(list(shards[::replicas]), dim=self.dim)

    def local_shape(self, shape: tuple[int, ...], world_size: int) -> tuple[int, ...]:
        if self.dim is None:
            return shape
        local = list(shape)
        local[self.dim] = shape[self.dim] // self.units * local_units(self.units, world_size)
        return tuple(local)


REPLICATED = Split(None)


def check_shardable(config: ModelConfig, world_size: int) -> None:
    """Raise `ConfigError` unless every split of the model divides evenly among `world_size`."""
    if world_size == 1:
        return
    needs = {
        "n_heads": config.n_heads,
        "ffn_hidden_dim": config.ffn_hidden_dim,
        "vocab_size": config.vocab_size,
    }
    for name, value in needs.items():
        if value % world_size:
            raise ConfigError(
                f"tensor parallelism over {world_size} ranks needs {name} ({value}) to be a "
                f"multiple of {world_size}"
            )
    kv = config.n_kv_heads
    if kv % world_size and world_size % kv:
        raise ConfigError(
            f"tensor parallelism over {world_size} ranks needs n_kv_heads ({kv}) to divide "
            f"{world_size} or be a multiple of it"
        )


def _as_heads(width: int | Heads) -> Heads:
    return width if isinstance(width, Heads) else Heads(width, 1)


class ColumnParallelLinear(Linear):
    """Output rows cut between ranks. Each part (`{"wq": Heads(32, 128), ...}`, or one width) is
    cut by its own units, so the local weight stacks this rank's slice of every part
    (`[wq_r | wk_r | wv_r]`). With `gather`, the ranks' outputs are put side by side (the LM
    head's logits)."""

    def __init__(
        self,
        in_features: int,
        parts: Mapping[str, int | Heads] | int | Heads,
        tp: TensorParallel,
        *,
        gather: bool = False,
    ):
        heads = {k: _as_heads(w) for k, w in parts.items()} if isinstance(parts, Mapping) else None
        heads = heads or {"": _as_heads(parts)}
        local = {k: local_units(h.count, tp.world_size) * h.size for k, h in heads.items()}
        super().__init__(in_features, local)
        self.splits = {k: Split(0, h.count) for k, h in heads.items()}
        self.tp = tp
        self.gather = gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.tp.all_gather(y) if self.gather else y


class RowParallelLinear(Linear):
    """Input columns cut between ranks (by heads, or single columns): each rank's product is a
    partial sum over its columns, and one all-reduce adds them."""

    def __init__(self, in_features: int | Heads, out_features: int, tp: TensorParallel):
        heads = _as_heads(in_features)
        super().__init__(local_units(heads.count, tp.world_size) * heads.size, out_features)
        self.splits = {"": Split(1, heads.count)}
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows cut between ranks by vocabulary id: each rank looks up the ids it holds,
    zeros elsewhere, and one all-reduce puts every row together."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel):
        super().__init__()
        self.split = Split(0, vocab_size)
        self.rows = vocab_size // tp.world_size
        self.first = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, dim))
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill_(outside.unsqueeze(-1), 0))


@dataclass(frozen=True)
class Slot:
    """A checkpoint tensor as the model needs it: its full shape, and how ranks split it."""

    shape: tuple[int, ...]
    split: Split


def checkpoint_layout(model: nn.Module) -> dict[str, Slot]:
    """The split table of a model (a `nucleus.model.Transformer`): every checkpoint tensor it
    reads, by checkpoint name, with its full shape and its `Split`."""
    world = model.tp.world_size
    layout: dict[str, Slot] = {}
    for name, module in model.named_modules():
        owner = model.checkpoint_name(name)
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            names = module.checkpoint_names(owner)
            for (part, width), split in zip(names.items(), module.splits.values(), strict=True):
                local = (width, module.in_features)
                layout.setdefault(part, Slot(_full_shape(local, split, world), split))
        elif isinstance(module, VocabParallelEmbedding):
            local = tuple(module.weight.shape)
            layout[f"{owner}.weight"] = Slot(_full_shape(local, module.split, world), module.split)
        else:
            for param, value in module.named_parameters(prefix=owner, recurse=False):
                layout[param] = Slot(tuple(value.shape), REPLICATED)
    return layout


def _full_shape(local: tuple[int, ...], split: Split, world_size: int) -> tuple[int, ...]:
    full = list(local)
    full[split.dim] = local[split.dim] // local_units(split.units, world_size) * split.units
    return tuple(full)
