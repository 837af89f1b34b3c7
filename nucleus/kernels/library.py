"""The CPU kernels' shared library: compiled once per source, flags and CPU, cached, loaded by ctypes.

All the C sources of `nucleus/kernels` build into one library (plain C with OpenMP, no torch
headers: about two seconds), cached under `$NUCLEUS_CACHE/kernels/` by a hash of the sources, the
compiler, its flags and the CPU (`-march=native`). A later start only hashes the sources and loads
the library; the compiler is looked for only when there is something to build. Without a C
compiler, or with `NUCLEUS_CPU_KERNELS=0`, nothing is built and `load()` returns None: the callers
fall back to torch.

This module imports neither torch nor numpy: `nucleus generate` on the CPU runs without torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from nucleus.assets import cache_dir, file_lock

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = [
    _HERE / n
    for n in (
        "paged_attention.c",
        "block_linear.c",
        "elementwise.c",
        "quantized.c",
        "llama_forward.c",
        "team.c",
    )
]
HEADERS = [_HERE / n for n in ("simd.h", "kernels.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable = False

# Arguments are passed as plain ints (tensor and array data pointers included): cheaper than typed
# ctypes pointers on the hot path.
i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int

# name -> (argument types, return type) of every exported kernel.
_SIGNATURES: dict[str, tuple[list, type | None]] = {
    "paged_decode_attention_f32": ([ptr] * 5 + [i64, ptr, i64, i64, i64, i64, i64, f32, i32], i32),
    "paged_prefill_attention_f32": ([ptr] * 8 + [i64, i64, i64, i64, i64, i64, f32, i32], i32),
    "write_kv_f32": ([ptr] * 5 + [i64, i64, i64], i32),
    "block_int8_linear_f32": ([ptr] * 5 + [i64, i64, i64, i32], i32),
    "rms_norm_f32": ([ptr, ptr, ptr, i64, i64, f32, i32], None),
    "silu_mul_f32": ([ptr, ptr, i64, i64, i32], None),
    "rotary_f32": ([ptr, ptr, i64, i64, i64, i64, i32], None),
    "quantized_linear_f32": ([ptr, ptr, i64, ptr, i32], i32),
    "quantize_activations_f32": ([i64, ptr, i64, i64, ptr], None),
    "dequantize_rows_f32": ([ptr, i64, i64, ptr], None),
    "llama_forward": ([ptr, ptr], i32),
    "repacked_bytes": ([i64, i64, i64], i64),
    "repack_rows8": ([i64, ptr, i64, i64, ptr], None),
}


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _library_path() -> Path:
    source = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS])
    compiler_name = os.environ.get("CC") or "cc"
    key = hashlib.sha256(
        source + " ".join([compiler_name, *FLAGS]).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"nucleus-cpu-{key}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if target.exists():  # another process built it while we waited
            return
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run(
                [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
            built.replace(target)


def load() -> ctypes.CDLL | None:
    """The compiled library, built on first use; None when the CPU kernels are off or cannot
    build (a warning says why)."""
    global _library, _unavailable
    if _library is not None or _unavailable:
        return _library
    with _lock:
        if _library is not None or _unavailable:
            return _library
        if os.environ.get("NUCLEUS_CPU_KERNELS", "1") == "0":
            _unavailable = True
            return None
        # Threads between parallel regions sleep rather than spin: the kernels' own barriers
        # (nucleus/kernels/team.c) do the waiting inside a step, and a thread spinning between
        # steps takes a core from Python's work on them (read when libgomp loads, with the library).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            target = _library_path()
            if not target.exists():
                _build(target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or e
            log.warning("CPU kernels unavailable, using the torch paths: %s", detail)
            _unavailable = True
            return None
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = restype
        _library = lib
        return lib


def require() -> ctypes.CDLL:
    """The compiled library, for a caller that checked `load()` first (or has no fallback)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available (no C compiler, or turned off)")
    return lib


def default_num_threads() -> int:
    """The CPUs this process may run on (torch's default thread count, without torch)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
