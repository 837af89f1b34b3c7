"""Host <-> device copies that never make the host wait for the device.

A plain `torch.tensor(values, device="cuda")` (or `.to("cuda")`) copies synchronously: the host
stalls until every step already queued on the device has run, which undoes launching steps ahead
(docs/scheduling.md). These copies go through pinned memory and are queued on the stream instead.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_device", "to_host"]


def to_device(
    values: list | np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A tensor of `values` on `device`, its copy queued without waiting."""
    if torch.device(device).type != "cuda":
        return torch.as_tensor(values, dtype=dtype, device=device)
    host = torch.as_tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`, queued without waiting (into pinned memory from a GPU)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
