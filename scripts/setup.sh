#!/usr/bin/env bash
# Creates .venv and installs nucleus with its test tools. Idempotent; safe to run again.
# torch goes first, pinned: a dependency that asks for "torch" alone would otherwise pull a
# multi-GB CUDA build onto CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
