"""Llama 3 tokenizer (tiktoken BPE, Meta's ``tokenizer.model``) and chat format.

Reproduces Meta's ``llama3`` reference (``llama/tokenizer.py``) exactly: the same pre-tokenisation
pattern, the same 256 special tokens, the same 400,000-character windows and 25,000-character
run splitting, the same chat format. Unlike the reference it validates its inputs and raises
clear errors instead of failing deep inside tiktoken.
"""

from __future__ import annotations

import base64
import binascii
import functools
import operator
import os
import re
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

import tiktoken

if TYPE_CHECKING:
    from nucleus.hf_tokenizer import HFTokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role  # any string is accepted and encoded as text, as in the reference
    content: str


Dialog = Sequence[Message]

# Meta's pattern; the *original* cl100k_base pattern (newer tiktoken rewrote cl100k's own).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken crashes (PanicException) on very long inputs, and its BPE slows down on long runs of
# one character class: the reference encodes windows of at most these many characters.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

SPECIAL_TOKEN_NAMES: list[str] = [
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",  # 128001
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",  # 128007
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # 128009, end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]


def split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Splits ``s`` so that no piece holds a run of more than ``max_consecutive_slice_len``
    consecutive whitespace (``str.isspace``) or non-whitespace characters.

    Same output as the reference's ``_split_whitespaces_or_nonwhitespaces``: a cut happens only
    inside a run longer than the limit, every ``max_consecutive_slice_len`` characters from the
    run's start; pieces otherwise hold many runs. Like the reference, ``""`` gives one piece ``""``.

    Args:
        s: the text to split.
        max_consecutive_slice_len: the longest run a piece may hold (>= 1).

    Returns:
        An iterator over the pieces, which concatenate to ``s``.
    """
    step = max_consecutive_slice_len
    start = 0
    # Python's \s on str is exactly str.isspace() (both use Py_UNICODE_ISSPACE; tested).
    for run in _long_runs_regex(step).finditer(s):
        for cut in range(run.start() + step, run.end(), step):
            yield s[start:cut]
            start = cut
    yield s[start:]


@functools.lru_cache(maxsize=8)
def _long_runs_regex(max_len: int) -> re.Pattern[str]:
    """Matches each maximal run of whitespace / non-whitespace longer than ``max_len``.

    The lookbehinds let a match start only where a run starts, so the scan stays linear (without
    them every position inside a long run would rescan the rest of the run).
    """
    if max_len < 1:
        raise ValueError(f"max_consecutive_slice_len must be >= 1, got {max_len}")
    n = max_len + 1
    return re.compile(rf"(?<!\s)\s{{{n},}}|(?<!\S)\S{{{n},}}")


def load_bpe_ranks(model_path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Reads a tiktoken BPE file: one ``"<base64 token bytes> <rank>"`` line per token.

    Args:
        model_path: path of the file (Meta's ``tokenizer.model``).

    Returns:
        The mergeable ranks, token bytes -> rank, with ranks exactly ``0..n-1``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a tiktoken BPE file.
    """
    path = os.fspath(model_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}: line {lineno} is not '<base64 bytes> <rank>' (is this a tiktoken "
                f"tokenizer.model?): {line[:80]!r}"
            ) from None
    if not ranks:
        raise ValueError(f"{path}: no BPE ranks found (empty file?)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once, one per token")
    return ranks


def check_token_ids(t: Sequence[int], n_words: int, caller: str) -> list[int]:
    """`t` as a list of ints, or a TypeError/ValueError naming the caller, the id and its place."""
    if isinstance(t, (str, bytes)):
        raise TypeError(f"{caller}: token ids must be a sequence of ints, got {type(t).__name__}")
    ids = []
    for pos, token_id in enumerate(t):
        try:
            token_id = operator.index(token_id)  # int, numpy integer; not float
        except TypeError:
            raise TypeError(
                f"{caller}: token ids must be integers, got {token_id!r} at position {pos}"
            ) from None
        if not 0 <= token_id < n_words:
            raise ValueError(
                f"{caller}: token id {token_id} at position {pos} is outside [0, {n_words})"
            )
        ids.append(token_id)
    return ids


class Tokenizer:
    """Tokenizes and encodes/decodes text using the Tiktoken tokenizer, as Meta's Llama 3."""

    special_tokens: dict[str, int]
    num_reserved_special_tokens = NUM_RESERVED_SPECIAL_TOKENS
    pat_str = PAT_STR

    def __init__(self, model_path: str | os.PathLike[str]):
        """Initializes the Tokenizer with a Tiktoken model.

        Args:
            model_path: path to the Tiktoken model file (Meta's ``tokenizer.model``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a tiktoken BPE file.
        """
        mergeable_ranks = load_bpe_ranks(model_path)
        self.num_base_tokens = len(mergeable_ranks)
        self.special_tokens = {
            name: self.num_base_tokens + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)
        }
        self.model = tiktoken.Encoding(
            name=os.path.basename(os.fspath(model_path)),
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self.stop_tokens: set[int] = {
            self.special_tokens["<|end_of_text|>"],
            self.special_tokens["<|eot_id|>"],
        }

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encodes a string into a list of token IDs.

        Special-token text (e.g. ``"<|eot_id|>"``) is encoded as ordinary text unless it is in
        ``allowed_special``. The string is encoded in windows of 400,000 characters, each cut
        further inside runs of more than 25,000 whitespace / non-whitespace characters; the pieces
        are encoded independently (regex and BPE never cross a cut), as in the reference.

        Args:
            s: the string to encode.
            bos: whether to prepend the beginning-of-sequence token.
            eos: whether to append the end-of-sequence token.
            allowed_special: special tokens whose text encodes to their id (``"all"`` for every one).
            disallowed_special: special tokens whose text raises ``ValueError`` when present and not
                allowed (``"all"`` for every one); the default ``()`` raises for none.

        Returns:
            The token IDs.

        Raises:
            TypeError: ``s`` is not a ``str``.
            ValueError: disallowed special-token text occurs in ``s``.
        """
        if type(s) is not str:  # the reference asserts the exact type, subclasses included
            raise TypeError(f"encode: argument 's' must be a str, got {type(s).__name__}")
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        t: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            window = s[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in split_whitespaces_or_nonwhitespaces(window, MAX_NO_WHITESPACES_CHARS):
                t.extend(
                    self.model.encode(
                        piece,
                        allowed_special=allowed_special,
                        disallowed_special=disallowed_special,
                    )
                )
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def encode_prompt(self, s: str) -> list[int]:
        """A plain-text prompt as the reference's `text_completion` encodes it: BOS, no EOS,
        special-token text encoded as text."""
        return self.encode(s, bos=True, eos=False)

    def decode(self, t: Sequence[int]) -> str:
        """Decodes a list of token IDs into a string.

        Token bytes are concatenated and decoded as UTF-8 with invalid bytes replaced by U+FFFD;
        special tokens decode to their text, e.g. ``"<|eot_id|>"``.

        Args:
            t: the token IDs, each in ``[0, n_words)``.

        Returns:
            The decoded string.

        Raises:
            TypeError: an element of ``t`` is not an integer.
            ValueError: an id is outside ``[0, n_words)``.
        """
        return self.model.decode(self._check_ids(t, "decode"))

    def token_bytes(self, token_id: int) -> bytes:
        """Returns the bytes of one token (a special token's bytes are its UTF-8 text).

        Args:
            token_id: an id in ``[0, n_words)``.

        Returns:
            The token's bytes.
        """
        return self.model.decode_single_token_bytes(self._check_ids([token_id], "token_bytes")[0])

    def _check_ids(self, t: Sequence[int], caller: str) -> list[int]:
        return check_token_ids(t, self.n_words, caller)


class ChatFormat:
    """Llama 3 instruct chat format (Meta's ``llama3`` repo: no tools, content stripped).

    Works on any tokenizer of the Llama 3 vocabulary: Meta's ``tokenizer.model``, or its
    ``tokenizer.json`` or GGUF form (``HFTokenizer``), with the same ids.
    """

    def __init__(self, tokenizer: Tokenizer | HFTokenizer):
        self.tokenizer = tokenizer

    def _encode_text(self, s: str) -> list[int]:
        """``s`` with special-token text encoded as ordinary text, as Meta's tokenizer does by
        default; ``HFTokenizer`` must be told (its default maps that text to the special ids)."""
        if isinstance(self.tokenizer, Tokenizer):
            return self.tokenizer.encode(s, bos=False, eos=False)
        return self.tokenizer.encode(s, bos=False, eos=False, special=False)

    def encode_header(self, message: Message) -> list[int]:
        """Encodes ``<|start_header_id|>{role}<|end_header_id|>\\n\\n``.

        Args:
            message: a message; only its ``role`` is used, encoded as ordinary text.

        Returns:
            The token IDs of the header.
        """
        tok = self.tokenizer
        tokens = [tok.special_tokens["<|start_header_id|>"]]
        tokens.extend(self._encode_text(message["role"]))
        tokens.append(tok.special_tokens["<|end_header_id|>"])
        tokens.extend(self._encode_text("\n\n"))
        return tokens

    def encode_message(self, message: Message) -> list[int]:
        """Encodes a header, the stripped content (special-token text as text), ``<|eot_id|>``.

        Args:
            message: a message with ``role`` and ``content``.

        Returns:
            The token IDs of the message.
        """
        tokens = self.encode_header(message)
        tokens.extend(self._encode_text(message["content"].strip()))
        tokens.append(self.tokenizer.special_tokens["<|eot_id|>"])
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """Encodes a dialog as a prompt for the model to write the assistant's next message.

        Args:
            dialog: the messages, in order.

        Returns:
            ``<|begin_of_text|>``, every message, then an open assistant header.
        """
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens.extend(self.encode_message(message))
        # The model writes the assistant's reply after this header.
        tokens.extend(self.encode_header({"role": "assistant", "content": ""}))
        return tokens
