"""Triton kernels for CUDA, one file per job, each tested against its torch twin.

They run on the GPU, and on the CPU under `TRITON_INTERPRET=1` (how CI tests them: that variable
must be set before these modules are imported). Nothing here is imported until a CUDA model asks
for it (`nucleus.ops.select_ops`, `nucleus.attention.select_backend`).
"""

from __future__ import annotations

import importlib.util
import os


def triton_usable(device_type: str) -> bool:
    """Whether the Triton kernels can run on tensors of `device_type`: CUDA with Triton
    installed, or any device under `TRITON_INTERPRET=1`. `NUCLEUS_TRITON=0` turns them off."""
    if os.environ.get("NUCLEUS_TRITON", "1") == "0":
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
