"""The kernels' shared library: built once per source and CPU, cached, optional.

Oracle: the file system (what is built where) and which paths `select_ops` / `select_backend`
choose when the library is missing.
"""

from __future__ import annotations

import torch

from nucleus.attention import KVCache, TorchBackend, select_backend
from nucleus.kernels import cpu as cpu_kernels
from nucleus.kernels import library


def test_without_a_compiler_nothing_is_built_and_the_torch_paths_run(monkeypatch):
    monkeypatch.setattr(library, "_library", None)
    monkeypatch.setattr(library, "_unavailable", False)
    monkeypatch.setenv("NUCLEUS_CPU_KERNELS", "0")
    from nucleus.ops import select_ops

    assert not cpu_kernels.available()
    assert select_ops(torch.device("cpu"), torch.float32, 64).name == "torch"
    kv = KVCache(torch.zeros(1, 1, 16, 1, 64), torch.zeros(1, 1, 16, 1, 64))
    assert type(select_backend(kv)) is TorchBackend


def test_a_failing_compiler_leaves_the_torch_paths(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(library, "_library", None)
    monkeypatch.setattr(library, "_unavailable", False)
    monkeypatch.setenv("NUCLEUS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert library.load() is None
    assert "CPU kernels unavailable" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_the_library_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(library, "_library", None)
    monkeypatch.setattr(library, "_unavailable", False)
    monkeypatch.setenv("NUCLEUS_CACHE", str(tmp_path))
    assert library.load() is not None
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(library, "_library", None)
    assert library.load() is not None  # loaded from the cache, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
