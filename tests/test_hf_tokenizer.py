"""`HFTokenizer`: the default model's GGUF vocabulary against llama.cpp, and the common interface.

Oracles:
- llama.cpp's own tokenizer (llama-cpp-python 0.3.36) on a varied corpus: its ids are stored in
  `tests/data/smollm2_llamacpp_ids.json.gz` by `tests/data/gen_gguf_tokenizer_ids.py` (llama.cpp
  takes minutes to build, so it is not a test dependency).
- transformers' GGUF tokenizer, where it is faithful: its conversion drops the default model's
  digit-splitting step, so it is compared on digit-free strings as it is, and on every string
  once `Digits(individual_digits=True)` is put back in front of its byte-level step.
- `nucleus.Tokenizer` (tiktoken, Meta's reference) for a Hugging Face `tokenizer.json`: the
  Llama 3 tokenizer's two files must give the same ids.
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from vocabularies import spm_fixture, spm_gguf_metadata

from nucleus.hf_tokenizer import HFTokenizer, TokenizerError
from nucleus.loaders.gguf import read_gguf_metadata

FIXTURE = Path(__file__).parent / "data" / "smollm2_llamacpp_ids.json.gz"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from nucleus.assets import asset_path

    return asset_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def metadata(gguf_path):
    return read_gguf_metadata(gguf_path)


@pytest.fixture(scope="module")
def tok(metadata) -> HFTokenizer:
    return HFTokenizer.from_gguf(metadata, name="smollm2")


@pytest.fixture(scope="module")
def expected() -> dict:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def transformers_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _has_category(s: str, prefix: str) -> bool:
    return any(unicodedata.category(c).startswith(prefix) for c in s)


def _transformers_comparable(strings: list[str]) -> list[str]:
    """Strings without unassigned code points: llama.cpp splits each of those into a piece of its
    own (see `_GPT2` in nucleus/hf_tokenizer.py), which the model's own tokenizer does not."""
    return [s for s in strings if not _has_category(s, "Cn")]


def _mismatches(strings, got, want) -> list[tuple[str, list[int], list[int]]]:
    return [(s, g, w) for s, g, w in zip(strings, got, want, strict=True) if g != w]


def test_fixture_is_for_this_model(expected, gguf_path):
    assert expected["gguf"] == gguf_path.name
    assert len(expected["strings"]) >= 1000


def test_ids_match_llama_cpp(tok, expected):
    strings = expected["strings"]
    got = [tok.encode(s, bos=False, eos=False) for s in strings]
    bad = _mismatches(strings, got, expected["special"])
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, first: {bad[:3]}"


def test_ids_match_llama_cpp_with_special_text_as_text(tok, expected):
    strings = expected["strings"]
    want = [
        b if a is None else a
        for a, b in zip(expected["no_special"], expected["special"], strict=True)
    ]
    assert any(a is not None for a in expected["no_special"])  # the corpus has special text
    got = [tok.encode(s, bos=False, eos=False, special=False) for s in strings]
    bad = _mismatches(strings, got, want)
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, first: {bad[:3]}"


def test_transformers_gguf_tokenizer_on_digit_free_strings(tok, expected, transformers_tokenizer):
    strings = [
        s for s in _transformers_comparable(expected["strings"]) if not _has_category(s, "N")
    ]
    assert len(strings) > 500
    got = [tok.encode(s, bos=False, eos=False) for s in strings]
    want = [transformers_tokenizer.encode(s, add_special_tokens=False) for s in strings]
    bad = _mismatches(strings, got, want)
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, first: {bad[:3]}"


def test_transformers_gguf_tokenizer_with_digit_splitting_restored(
    tok, expected, transformers_tokenizer
):
    backend = Tokenizer.from_str(transformers_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
    )
    strings = _transformers_comparable(expected["strings"])
    assert len(strings) > 1400
    got = [tok.encode(s, bos=False, eos=False) for s in strings]
    want = [backend.encode(s, add_special_tokens=False).ids for s in strings]
    bad = _mismatches(strings, got, want)
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, first: {bad[:3]}"
    # and without it, transformers is wrong on digits where llama.cpp is right
    plain = transformers_tokenizer.backend_tokenizer
    assert any(
        plain.encode(s, add_special_tokens=False).ids != g
        for s, g in zip(strings, got, strict=True)
    )


def test_default_model_special_ids(tok):
    assert tok.n_words == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.stop_tokens == {2, 0}  # <|im_end|> and <|endoftext|>, as llama.cpp's EOG set
    assert tok.special_tokens["<|im_end|>"] == 2 and len(tok.special_tokens) == 17
    assert tok.add_bos is False
    assert tok.chat_template.startswith("{% for message in messages %}")


def test_encode_adds_bos_and_eos_only_when_asked(tok):
    plain = tok.encode("Hello world", bos=False, eos=False)
    assert tok.encode("Hello world", bos=True, eos=False) == [1, *plain]
    assert tok.encode("Hello world", bos=False, eos=True) == [*plain, 2]
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert tok.encode("<|im_start|>", bos=True, eos=False) == [1, 1]
    with pytest.raises(TypeError):
        tok.encode(b"bytes", bos=False, eos=False)


def test_decode(tok):
    text = "<|im_start|>user\nCafé 123 😀<|im_end|>\n"
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nCafé 123 😀\n"
    emoji = tok.encode("😀", bos=False, eos=False)
    assert len(emoji) > 1 and tok.decode(emoji[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([49152])
    with pytest.raises(TypeError):
        tok.decode([1.5])


def _tiny_gguf_vocab(**overrides):
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "a", "b", "▁a"]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1, 1]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -0.5],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    metadata.update(overrides)
    return metadata


def test_sentencepiece_vocabulary():
    tok = HFTokenizer.from_gguf(_tiny_gguf_vocab())
    a, b, sp, sp_a = 260, 261, 259, 262
    # a prefix space, spaces as ▁, the merge "▁" + "a", byte fallback for what is not in the vocab
    assert tok.encode("a", bos=False, eos=False) == [sp_a]
    assert tok.encode("ab a", bos=True, eos=False) == [1, sp_a, b, sp_a]
    assert tok.encode("é", bos=False, eos=False) == [sp, 3 + 0xC3, 3 + 0xA9]
    assert tok.encode("a</s>a", bos=False, eos=False) == [sp_a, 2, sp_a]  # prefix after specials
    assert tok.decode(tok.encode("ab aé", bos=True, eos=False), skip_special_tokens=True) == "ab aé"
    assert tok.add_bos and (tok.bos_id, tok.eos_id) == (1, 2)
    no_prefix = HFTokenizer.from_gguf(
        _tiny_gguf_vocab(**{"tokenizer.ggml.add_space_prefix": False})
    )
    assert no_prefix.encode("a", bos=False, eos=False) == [a]


def test_unsupported_vocabularies_are_named(metadata):
    with pytest.raises(TokenizerError, match="'bert'"):
        HFTokenizer.from_gguf({**metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="'no-such-pre'"):
        HFTokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError, match="no tokenizer"):
        HFTokenizer.from_gguf({"general.architecture": "llama"})


def test_from_file_reads_the_hf_configs(tok, tmp_path):
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>", "special": True},
                "pad_token": "<|endoftext|>",
                "chat_template": "{{ messages[0]['content'] }}",
                "add_bos_token": False,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    loaded = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    assert loaded.stop_tokens == {0, 2, 5}
    assert loaded.chat_template == "{{ messages[0]['content'] }}"
    assert loaded.encode("a 12 <|im_end|>", bos=True, eos=False) == tok.encode(
        "a 12 <|im_end|>", bos=True, eos=False
    )
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        (tmp_path / "bad.json").write_text("{}")
        HFTokenizer.from_file(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def llama3_reference():
    from nucleus.assets import asset_path
    from nucleus.tokenizer import Tokenizer as ReferenceTokenizer

    return ReferenceTokenizer(asset_path("llama3-tokenizer"))


def _llama3_strings() -> list[str]:
    from tokenizer_corpus import corpus

    # the reference cuts runs longer than 25,000 characters; tokenizers does not
    return [s for s in corpus() if len(s) <= 20_000]


def test_llama3_tokenizer_json_matches_the_reference_tokenizer(llama3_reference):
    from nucleus.assets import asset_path

    hf = HFTokenizer.from_file(asset_path("llama3-tokenizer-json"))
    assert hf.n_words == llama3_reference.n_words == 128256
    for s in _llama3_strings():
        want = llama3_reference.encode(s, bos=False, eos=False)
        assert hf.encode(s, bos=False, eos=False, special=False) == want, s
        assert hf.decode(want) == llama3_reference.decode(want), s
    assert hf.encode("<|eot_id|>", bos=False, eos=False) == [128009]


def test_llama3_gguf_vocabulary_matches_the_reference_tokenizer(llama3_reference):
    """A Llama 3 GGUF's vocabulary (`gpt2` type, `llama-bpe` pre-tokenizer), made as llama.cpp's
    converter makes it from the tokenizer.json, tokenizes as Meta's tiktoken tokenizer."""
    from nucleus.assets import asset_path

    spec = json.loads(asset_path("llama3-tokenizer-json").read_text(encoding="utf-8"))
    tokens = [""] * 128256
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 128000 + [3] * 256,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
    }
    tok = HFTokenizer.from_gguf(metadata)
    assert tok.add_bos and tok.bos_id == 128000
    assert tok.stop_tokens == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
    for s in _llama3_strings():
        want = llama3_reference.encode(s, bos=True, eos=False)
        assert tok.encode(s, bos=True, eos=False, special=False) == want, s
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert tok.encode(text, bos=False, eos=False) == llama3_reference.encode(
        text, bos=False, eos=False, allowed_special="all"
    )


def test_sentencepiece_vocabulary_matches_llama_cpp():
    data = spm_fixture()
    tok = HFTokenizer.from_gguf(spm_gguf_metadata(data))
    strings = data["strings"]
    got = [tok.encode(s, bos=False, eos=False) for s in strings]
    bad = _mismatches(strings, got, data["ids"])
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, first: {bad[:3]}"
