import importlib.util
import os
import sys
from pathlib import Path

# Test helper modules (checkpoints.py, tokenizer_corpus.py) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# CI has no GPU: the Triton kernels run on the CPU through Triton's interpreter there. The
# variable must be set before any kernel module is imported (Triton reads it at `@triton.jit`).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_scalars_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter holds a kernel's scalars as one-element arrays and turns them into
    ints with `int(array)`, which NumPy 2.4 refuses for arrays of one dimension: a loop bounded by
    a loaded or computed scalar (`for i in range(start, end)`) fails there. Read the one element
    instead; compiled kernels (on a GPU) are not affected."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _interpreter_scalars_for_numpy_2_4()
