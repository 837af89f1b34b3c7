"""`Linear`: the model's matrix products, one seam for the weight's form and its fused parts.

A `Linear` may hold several checkpoint matrices stacked along its output (`parts`: Q/K/V, or the
SwiGLU gate and up projections), fused when the weights are loaded so that a step reads them in
one product. The table of parts lives here, with the layer: loading (`checkpoint_shapes`,
`fuse_parts`) reads it one way, and a split for tensor parallelism will read it the other.

The weight's form is chosen once, when the weight is placed (`loaders.build_transformer`): a dense
matrix of any dtype (`F.linear`), or on the CPU a GGUF matrix kept as 8-bit blocks for the C
kernel (`use_block_int8`), which computes the same values from a quarter of the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nucleus.kernels import cpu as cpu_kernels
from nucleus.kernels.cpu import BlockInt8Weight


class Linear(nn.Module):
    """Bias-free `x @ weight.T`. `parts` names the checkpoint matrices stacked in `weight`, in
    order, with their output widths (one part, named after the layer itself, when not fused)."""

    def __init__(self, in_features: int, parts: Mapping[str, int] | int):
        super().__init__()
        if isinstance(parts, int):
            parts = {"": parts}
        self.in_features = in_features
        self.parts = dict(parts)
        self.out_features = sum(self.parts.values())
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.block_int8: BlockInt8Weight | None = None
        self._matmul: Callable[[torch.Tensor], torch.Tensor] = self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.block_int8_linear(x, self.block_int8)

    def use_block_int8(self, packed: BlockInt8Weight) -> None:
        """Multiply with the 8-bit block form of this (float32, CPU) weight from now on."""
        if packed.shape != tuple(self.weight.shape):
            raise ValueError(f"block-int8 shape {packed.shape} != the weight's {self.weight.shape}")
        self.block_int8 = packed
        self._matmul = self._blocks

    def checkpoint_names(self, qualified_name: str) -> dict[str, int]:
        """Checkpoint name of each part -> its output width, for this layer at `qualified_name`
        in the model (e.g. `layers.0.attention.wqkv` -> `layers.0.attention.wq.weight`, ...)."""
        owner, _, own = qualified_name.rpartition(".")
        owner = f"{owner}." if owner else ""
        return {f"{owner}{name or own}.weight": width for name, width in self.parts.items()}


def fuse_parts(
    layer: Linear,
    qualified_name: str,
    weights: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The layer's weight on `device` in `dtype`: its checkpoint parts copied into place."""
    names = layer.checkpoint_names(qualified_name)
    if len(names) == 1:
        return weights[next(iter(names))].to(device=device, dtype=dtype)
    fused = torch.empty(layer.out_features, layer.in_features, device=device, dtype=dtype)
    row = 0
    for name, width in names.items():
        fused[row : row + width].copy_(weights[name])
        row += width
    return fused


def fuse_block_int8(
    layer: Linear, qualified_name: str, packed: Mapping[str, BlockInt8Weight]
) -> BlockInt8Weight | None:
    """The layer's 8-bit block form from its parts' (None unless every part has one)."""
    names = list(layer.checkpoint_names(qualified_name))
    if not all(n in packed for n in names):
        return None
    return BlockInt8Weight.concat([packed[n] for n in names])
