"""Tokenizers of the `tokenizers` library: a Hugging Face `tokenizer.json`, or a GGUF vocabulary.

`HFTokenizer` has the interface of `nucleus.Tokenizer` (`encode(s, *, bos, eos)`, `decode`,
`bos_id`, `eos_id`, `pad_id`, `stop_tokens`, `n_words`). `encode` never runs the library's
post-processor: the BOS/EOS ids are added by us, only when asked, so a `tokenizer.json` whose
template adds `<|begin_of_text|>` does not get it twice.

A GGUF vocabulary (`tokenizer.ggml.*`) is rebuilt to tokenize as llama.cpp does:

- `gpt2`: byte-level BPE with the merges of the file, split first by the regular expressions
  llama.cpp uses for the `tokenizer.ggml.pre` named in the file (e.g. `smollm` splits every digit
  on its own before the GPT-2 expression; `llama-bpe` is Llama 3's expression and ignores merges
  for whole words in the vocabulary).
- `llama`: SentencePiece; llama.cpp merges the adjacent pair whose result has the highest score,
  which is BPE with merges ranked by the score of their result. Spaces become `▁`, a `▁` is
  prepended to each piece of text (after every special token too) when `add_space_prefix`, and
  characters outside the vocabulary fall back to `<0xXX>` byte tokens.

Control, user-defined and unknown tokens of the GGUF are added tokens: their text in the input
encodes to their id (as llama.cpp with `parse_special=True`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from nucleus.tokenizer import check_token_ids

__all__ = ["HFTokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer file or vocabulary nucleus cannot build a tokenizer from."""


# llama.cpp token types (`tokenizer.ggml.token_type`)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as end of generation when the file has them.
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)

# The splitting expressions of llama.cpp's BPE pre-tokenizer types (src/llama-vocab.cpp), applied
# one after another, each keeping matches and the text between them as separate pieces.
#
# llama.cpp runs the GPT-2 expression with its own code, in which a code point of no Unicode
# category (unassigned, `Cn`) matches none of the classes: it is not part of a `[^\s\p{L}\p{N}]+`
# run but a piece of its own. `\p{Cn}` is taken out of that class and added as a last alternative
# so that Oniguruma splits the same way (found and checked against llama.cpp on random code
# points; no other category behaves differently).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}\p{Cn}]+|\s+(?!\S)|\p{Cn}"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (expressions, ignore_merges)
_BPE_PRE: dict[str, tuple[tuple[str, ...], bool]] = {}
for _names, _spec in (
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        ((_LLAMA3,), True),
    ),
    (("dbrx", "smaug-bpe"), ((_LLAMA3,), False)),
    (("chatglm-bpe", "glm4"), ((_LLAMA3,), False)),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo"), ((_QWEN2,), False)),
    (
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        ((r"\p{N}", _GPT2), False),
    ),
    (
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "trillion",
            "granite-docling",
        ),
        ((_GPT2,), False),
    ),
    (("default",), (_DEFAULT, False)),
):
    for _name in _names:
        _BPE_PRE[_name] = _spec


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the interface of `nucleus.Tokenizer`.

    Attributes:
        bos_id, eos_id: ids of the beginning/end-of-sequence tokens (-1 when there is none).
        pad_id: the padding id (-1 when there is none, as `nucleus.Tokenizer`).
        stop_tokens: ids that end generation: `eos_id` and end-of-turn tokens.
        n_words: vocabulary size, added tokens included.
        special_tokens: text -> id of every special (control) token.
        bos_token, eos_token: the texts of the BOS/EOS tokens ("" when there is none).
        add_bos: whether the model's own config asks for a BOS at the start of a prompt.
        chat_template: the Jinja2 chat template that came with the tokenizer, if any.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        stop_tokens: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        name: str = "tokenizer",
        make_plain: Callable[[], Tokenizer] | None = None,
    ):
        self.tokenizer = tokenizer
        self.name = name
        self.n_words: int = tokenizer.get_vocab_size(with_added_tokens=True)
        for what, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if value is not None and value >= 0 and not 0 <= value < self.n_words:
                raise TokenizerError(f"{name}: {what} id {value} is outside [0, {self.n_words})")
        self.bos_id: int = -1 if bos_id is None else bos_id
        self.eos_id: int = -1 if eos_id is None else eos_id
        self.pad_id: int = -1 if pad_id is None else pad_id
        self.stop_tokens: set[int] = {t for t in stop_tokens if 0 <= t < self.n_words}
        if self.eos_id >= 0:
            self.stop_tokens.add(self.eos_id)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self.bos_token = self.id_to_token(self.bos_id) if self.bos_id >= 0 else ""
        self.eos_token = self.id_to_token(self.eos_id) if self.eos_id >= 0 else ""
        self._plain: Tokenizer | None = None  # a copy that encodes special-token text as text
        self._make_plain = make_plain  # builds it (else it is derived from the JSON of `tokenizer`)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, n_words={self.n_words}, bos={self.bos_id}, eos={self.eos_id})"

    # ---- the common interface ---------------------------------------------------------------

    def encode(self, s: str, *, bos: bool, eos: bool, special: bool = True) -> list[int]:
        """Encodes a string into token ids.

        Args:
            s: the text.
            bos: prepend `bos_id`.
            eos: append `eos_id`.
            special: special-token text in `s` (e.g. "<|im_end|>") encodes to its id; with
                False it is encoded as ordinary text.

        Raises:
            TypeError: `s` is not a str.
            ValueError: `bos`/`eos` asked for but the tokenizer has no such token.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode: argument 's' must be a str, got {type(s).__name__}")
        tok = self.tokenizer if special else self._plain_tokenizer()
        # encode_batch releases the GIL (encode does not): other threads run meanwhile.
        ids = tok.encode_batch([s], add_special_tokens=False)[0].ids if s else []
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.name}: has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.name}: has no EOS token")
            ids.append(self.eos_id)
        return ids

    def encode_prompt(self, s: str) -> list[int]:
        """A user's plain-text prompt: BOS only if the model's config asks for one, and
        special-token text encoded as text (a user cannot inject control tokens)."""
        return self.encode(s, bos=self.add_bos, eos=False, special=False)

    def decode(self, t: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decodes token ids to text; special tokens show as their text unless skipped.

        Incomplete UTF-8 sequences decode to U+FFFD.

        Raises:
            TypeError: an id is not an integer.
            ValueError: an id is outside [0, n_words).
        """
        ids = self._check_ids(t, "decode")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- extras -------------------------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        text = self.tokenizer.id_to_token(token_id)
        if text is None:
            raise ValueError(f"{self.name}: no token with id {token_id}")
        return text

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def _plain_tokenizer(self) -> Tokenizer:
        if self._plain is None:
            # The same tokenizer without its special added tokens (user-defined ones stay, as in
            # llama.cpp without parse_special). `encode_special_tokens = True` would do the same,
            # but makes every encode about 20 times slower.
            if self._make_plain is not None:
                self._plain = self._make_plain()
            else:
                spec = json.loads(self.tokenizer.to_str())
                spec["added_tokens"] = [
                    t for t in spec.get("added_tokens") or [] if not t["special"]
                ]
                self._plain = Tokenizer.from_str(json.dumps(spec))
        return self._plain

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: a text of more than
        `k * max_token_chars` characters cannot encode to `k` tokens or fewer. A token's own
        string is never shorter than its text (a byte-level symbol per byte, `▁` per space,
        `<0xNN>` per fallback byte)."""
        return max(len(token) for token in self.tokenizer.get_vocab(with_added_tokens=True))

    def _check_ids(self, t: Sequence[int], caller: str) -> list[int]:
        return check_token_ids(t, self.n_words, caller)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        tokenizer_json: str | os.PathLike[str],
        tokenizer_config: str | os.PathLike[str] | dict[str, Any] | None = None,
    ) -> HFTokenizer:
        """From a Hugging Face `tokenizer.json`.

        BOS/EOS/PAD come from `tokenizer_config` (a path or the parsed dict; by default the
        `tokenizer_config.json` beside the file, if any); the EOS ids of `generation_config.json`
        and `config.json` beside it are stop tokens too (the first one is `eos_id` if the
        tokenizer config names none). The chat template is `tokenizer_config["chat_template"]`
        (or the default of a list of named templates), else a `chat_template.jinja` beside it.
        """
        path = Path(tokenizer_json)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such tokenizer file") from None
            raise TokenizerError(f"{path}: not a tokenizers JSON file ({e})") from None
        folder = path.parent
        if tokenizer_config is None and (folder / "tokenizer_config.json").is_file():
            tokenizer_config = folder / "tokenizer_config.json"
        if isinstance(tokenizer_config, (str, os.PathLike)):
            tokenizer_config = _read_json(Path(tokenizer_config))
        tc: dict[str, Any] = tokenizer_config or {}

        def id_of(key: str) -> int | None:
            text = _token_text(tc.get(key))
            if text is None:
                return None
            token_id = tok.token_to_id(text)
            if token_id is None:
                raise TokenizerError(f"{path}: {key} {text!r} is not in the vocabulary")
            return token_id

        stop: list[int] = []
        for extra in ("generation_config.json", "config.json"):
            if (folder / extra).is_file():
                stop += _ids(_read_json(folder / extra).get("eos_token_id"))
        eos_id = id_of("eos_token")
        if eos_id is None and stop:
            eos_id = stop[0]
        bos_id = id_of("bos_token")
        if bos_id is None:
            for extra in ("generation_config.json", "config.json"):
                if bos_id is None and (folder / extra).is_file():
                    found = _ids(_read_json(folder / extra).get("bos_token_id"))
                    bos_id = found[0] if found else None
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        add_bos = tc.get("add_bos_token")
        if add_bos is None:
            # a post-processor that adds the BOS says the model wants it
            add_bos = bos_id is not None and bos_id in tok.encode("a").ids[:1]
        return cls(
            tok,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=id_of("pad_token"),
            stop_tokens=stop,
            add_bos=bool(add_bos),
            chat_template=template if isinstance(template, str) else None,
            name=str(path),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], *, name: str = "GGUF") -> HFTokenizer:
        """From the `tokenizer.ggml.*` metadata of a GGUF file (see `read_gguf_metadata`).

        Raises:
            TokenizerError: no vocabulary, or a tokenizer type / pre-tokenizer llama.cpp names
                that nucleus does not build (the message names it).
        """
        model = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not model or not tokens:
            raise TokenizerError(f"{name}: no tokenizer.ggml.model / tokenizer.ggml.tokens")
        n = len(tokens)
        types = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * n)
        if len(types) != n:
            raise TokenizerError(f"{name}: {len(types)} token types for {n} tokens")
        if model == "gpt2":
            make, add_bos = _gguf_bpe(metadata, tokens, types, name)
        elif model == "llama":
            make, add_bos = _gguf_spm(metadata, tokens, types, name)
        else:
            raise TokenizerError(
                f"{name}: tokenizer type tokenizer.ggml.model = {model!r} is not supported "
                "(nucleus builds 'gpt2' byte-level BPE and 'llama' SentencePiece vocabularies)"
            )
        special, user = [], []
        for text, kind in zip(tokens, types, strict=True):
            if kind in (_CONTROL, _UNKNOWN):
                special.append(AddedToken(text, special=True, normalized=False))
            elif kind == _USER_DEFINED:
                user.append(AddedToken(text, special=False, normalized=False))
        # ids are kept: every added token is already in the model's vocabulary
        tok = make()
        tok.add_special_tokens(special)
        tok.add_tokens(user)
        for i, t in tok.get_added_tokens_decoder().items():
            if tokens[i] != t.content:
                raise TokenizerError(f"{name}: added token {t.content!r} got id {i}")

        def make_plain() -> Tokenizer:  # built again from the parsed vocabulary: much cheaper
            plain = make()  # than a copy through its JSON
            plain.add_tokens(user)
            return plain

        def opt_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < n else None

        eos_id = opt_id("eos_token_id")
        stop = [i for i in (opt_id("eot_token_id"), opt_id("eom_token_id")) if i is not None]
        index = {t: i for i, t in enumerate(tokens) if types[i] == _CONTROL}
        stop += [index[t] for t in _EOG_TEXTS if t in index]
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos)
        return cls(
            tok,
            bos_id=opt_id("bos_token_id"),
            eos_id=eos_id,
            pad_id=opt_id("padding_token_id"),
            stop_tokens=stop,
            add_bos=bool(add_bos),
            chat_template=metadata.get("tokenizer.chat_template"),
            name=name,
            make_plain=make_plain,
        )


def _gguf_bpe(
    metadata: dict[str, Any], tokens: list[str], types: list[int], name: str
) -> tuple[Callable[[], Tokenizer], bool]:
    """A function that builds the BPE tokenizer (no added tokens yet), and whether to add BOS."""
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    if pre not in _BPE_PRE:
        raise TokenizerError(
            f"{name}: BPE pre-tokenizer tokenizer.ggml.pre = {pre!r} is not supported (known: "
            f"{', '.join(sorted(_BPE_PRE))})"
        )
    expressions, ignore_merges = _BPE_PRE[pre]
    merges = []
    for m in metadata.get("tokenizer.ggml.merges") or []:
        cut = m.find(" ", 1)  # as llama.cpp: the separator is the first space after position 0
        if cut < 0:
            raise TokenizerError(f"{name}: malformed merge {m!r}")
        merges.append((m[:cut], m[cut + 1 :]))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{name}: the vocabulary has duplicate tokens")

    def make() -> Tokenizer:
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(e), behavior="isolated") for e in expressions]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    add_bos = pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")
    return make, add_bos


def _gguf_spm(
    metadata: dict[str, Any], tokens: list[str], types: list[int], name: str
) -> tuple[Callable[[], Tokenizer], bool]:
    """A function that builds the SentencePiece-style tokenizer (no added tokens yet), and whether
    to add BOS."""
    scores = metadata.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise TokenizerError(f"{name}: a 'llama' vocabulary needs tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED)}
    # llama.cpp merges the adjacent pair whose concatenation scores highest: rank every split of
    # every token into two tokens by the score of the token (ties by position in the vocabulary).
    ranked = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[pid], pid, mergeable[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = next((tokens[i] for i, k in enumerate(types) if k == _UNKNOWN), None)
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))

    def make() -> Tokenizer:
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", "▁")]
        if add_prefix:
            steps.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
        return tok

    return make, True
