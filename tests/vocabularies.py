"""Tokenizers of a kind no shipped asset has, for tests.

The SentencePiece (`llama`) vocabulary is the one `tests/data/gen_spm_llamacpp_ids.py` made and
stored with llama.cpp's ids for a corpus: 1,581 tokens (`<unk>`, `<s>`, `</s>`, 256 byte tokens,
learned pieces). It comes as GGUF metadata, and as the tokenizer of a small base model.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from checkpoints import Shape, random_meta_weights, write_meta_checkpoint

from nucleus.hf_tokenizer import HFTokenizer

SPM_FIXTURE = Path(__file__).parent / "data" / "spm_llamacpp_ids.json.gz"


def spm_fixture() -> dict[str, Any]:
    """The stored vocabulary (`tokens`, `scores`, `token_type`) and llama.cpp's `ids` of `strings`."""
    with gzip.open(SPM_FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


def spm_gguf_metadata(fixture: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata of the stored SentencePiece vocabulary, as llama.cpp's converter
    writes it; `extra` adds or replaces `tokenizer.ggml.` keys (named without the prefix)."""
    data = fixture or spm_fixture()
    metadata = {
        "model": "llama",
        "tokens": data["tokens"],
        "scores": data["scores"],
        "token_type": data["token_type"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unknown_token_id": 0,
        "add_space_prefix": True,
        **extra,
    }
    return {f"tokenizer.ggml.{k}": v for k, v in metadata.items()}


def write_base_model(folder: Path) -> tuple[Path, Path]:
    """A base model, which can complete text but not chat: a small random Meta checkpoint of the
    stored SentencePiece vocabulary, and that vocabulary as a `tokenizer.json` (no chat template,
    no Llama 3 chat tokens, no `tokenizer_config.json`). Returns the checkpoint and tokenizer."""
    tokenizer = HFTokenizer.from_gguf(spm_gguf_metadata())
    shape = Shape(
        dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=96, vocab_size=tokenizer.n_words
    )
    write_meta_checkpoint(folder, shape, random_meta_weights(shape, seed=0))
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    return folder, folder / "tokenizer.json"
