"""Triton's interpreter for CI, which has no GPU: the Triton kernels run on the CPU through it.

`set_up()` runs in the test process (conftest.py) and in any process the tests start that runs
Triton kernels (tensor-parallel workers), before a kernel module is imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def set_up() -> None:
    """Without a GPU, run Triton through its interpreter (Triton reads the variable at
    `@triton.jit`), with its scalars readable under NumPy 2.4."""
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidiactl").exists():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        _interpreter_scalars_for_numpy_2_4()


def _interpreter_scalars_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter holds a kernel's scalars as one-element arrays and turns them into
    ints with `int(array)`, which NumPy 2.4 refuses for arrays of one dimension: a loop bounded by
    a loaded or computed scalar (`for i in range(start, end)`) fails there. Read the one element
    instead; compiled kernels (on a GPU) are not affected."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "reads_one_element", False):
        return  # already set up in this process

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.reads_one_element = True
    interpreter._patch_lang_tensor = patch
