"""Weights from every format into the one `Transformer`."""

from __future__ import annotations

import torch

from nucleus.config import ModelConfig
from nucleus.loaders.errors import CheckpointError
from nucleus.model import Transformer, rope_frequencies

# Tensors some checkpoints carry that the model recomputes (Llama 2-era Meta `rope.freqs`).
_IGNORED_EXTRAS = {"rope.freqs"}

__all__ = ["CheckpointError", "build_transformer"]


def build_transformer(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Transformer:
    """Make the model on `device` in `dtype` from `weights`, checking names and shapes strictly.

    The model is created on the meta device and each weight is converted and assigned in turn, so
    at most one weight is in flight beside the (memory-mapped) checkpoint.
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    given = set(weights) - _IGNORED_EXTRAS
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the model config: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    state = {}
    for name, shape in expected.items():
        tensor = weights[name]
        if tensor.shape != shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model config needs {tuple(shape)}"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    # The RoPE frequencies are a non-persistent buffer: compute them for real on the target device.
    model.rope_freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(
        device
    )
    return model.eval()
