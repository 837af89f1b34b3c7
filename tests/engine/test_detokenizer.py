"""Incremental detokenization: never half a UTF-8 character, stop strings never retracted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleus.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """A byte-level toy: each id is a byte string; decode joins them with errors="replace"."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


LLAMA = "🦙".encode()  # 4 bytes
PIECES = [b"a", b"b", b" ", b"ab", LLAMA[:1], LLAMA[1:3], LLAMA[3:], "é".encode(), b"\xc3", b"\xa9"]
TOY = ByteTokenizer(PIECES)


def run(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add([t]) for t in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.fixture(scope="module")
def llama3():
    from nucleus.assets import asset_path
    from nucleus.tokenizer import Tokenizer

    return Tokenizer(asset_path("llama3-tokenizer"))


def test_llama3_multibyte_characters_split_across_tokens(llama3):
    text = "Llamas 🦙🦙 say 你好世界, naïve café 😀!"
    ids = llama3.encode(text, bos=False, eos=False)
    assert any(REPLACEMENT in llama3.decode([t]) for t in ids)  # the test means something
    deltas = run(IncrementalDetokenizer(llama3), ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == text


def test_llama3_stop_string_across_tokens_and_special_tokens_skipped(llama3):
    ids = llama3.encode("The answer is 42. Done here.", bos=False, eos=False)
    detok = IncrementalDetokenizer(llama3, stop=["Done"], skip_token_ids={128009})
    deltas = run(detok, [*ids, 128009])
    assert "".join(deltas) == "The answer is 42. " and detok.stop_reason == "Done"


def test_partial_character_is_held_until_complete():
    detok = IncrementalDetokenizer(TOY)
    assert detok.add([0]) == "a"
    assert detok.add([4]) == ""  # first byte of the llama
    assert detok.add([5]) == ""
    assert detok.add([6]) == "🦙"
    assert detok.add([8]) == ""
    assert detok.add([9]) == "é"


def test_a_dangling_partial_character_is_flushed_as_replacement():
    detok = IncrementalDetokenizer(TOY)
    assert detok.add([0, 4]) == ""  # tokens come in together: released together
    assert detok.flush() == "a" + REPLACEMENT


def test_text_that_may_start_a_stop_string_is_held_back_then_released():
    detok = IncrementalDetokenizer(TOY, stop=["abb"])
    assert detok.add([0]) == ""  # "a" could start "abb"
    assert detok.add([1]) == ""  # "ab" too
    assert detok.add([0]) == "ab"  # "aba": only the last "a" could
    assert detok.add([2]) == "a "
    assert detok.flush() == ""


def test_stop_string_spanning_tokens_cuts_before_it():
    detok = IncrementalDetokenizer(TOY, stop=["b b"])
    deltas = run(detok, [0, 3, 2, 1, 0, 0])
    assert "".join(deltas) == "aa" and detok.stop_reason == "b b"
    assert detok.add([0]) == ""  # ignored after the stop


def test_check_stop_false_releases_everything_and_never_retracts():
    detok = IncrementalDetokenizer(TOY, stop=["ab"])
    assert detok.add([0], check_stop=False) == "a"  # under min_tokens: no hold, no stop
    assert detok.add([1]) == "b"  # "ab" straddles released text: not a stop
    assert detok.add([3]) == "" and detok.stop_reason == "ab"


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, len(PIECES) - 1), max_size=20),
    stops=st.lists(st.text(alphabet="ab é🦙", min_size=1, max_size=3), max_size=3),
)
def test_deltas_add_up_to_the_decoded_text_cut_at_the_first_stop(ids, stops):
    detok = IncrementalDetokenizer(TOY, stop=stops)
    deltas = run(detok, ids)
    full = TOY.decode(ids)
    cuts = [full.find(s) for s in stops if s in full]
    expected = full[: min(cuts)] if cuts else full
    assert "".join(deltas) == expected
    # Only a character that can never be completed is shown as U+FFFD, and only at its place.
    assert "".join(d for d in deltas[:-1]).count(REPLACEMENT) <= expected.count(REPLACEMENT)
