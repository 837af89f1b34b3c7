"""Fixtures of the loader tests: the default model's GGUF, read once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from nucleus.assets import asset_path

    return asset_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    from nucleus.loaders.gguf import load_gguf_checkpoint

    return load_gguf_checkpoint(smollm2_gguf)
