"""Regenerate `spm_llamacpp_ids.json.gz`: llama.cpp's ids for a SentencePiece (`llama`) vocabulary.

No SentencePiece GGUF ships with nucleus, so this script makes one: a small BPE vocabulary
learned (deterministically) from part of `tests/tokenizer_corpus.py`, in SentencePiece's shape
(`▁` for spaces, `<unk>`/`<s>`/`</s>`, 256 `<0xXX>` byte tokens, scores ranking the merges),
written to a vocabulary-only GGUF and tokenized by llama.cpp. The vocabulary and llama.cpp's ids
for the corpus are stored together; `tests/test_hf_tokenizer.py` rebuilds the vocabulary as GGUF
metadata and checks `HFTokenizer.from_gguf` against the ids.

Run it where llama-cpp-python and gguf are installed (see `gen_gguf_tokenizer_ids.py`):

    python tests/data/gen_spm_llamacpp_ids.py
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

OUT = HERE / "spm_llamacpp_ids.json.gz"
N_MERGES = 1500
SPECIAL_STRINGS = [
    "<s>hello</s>",
    "a</s>b",
    "</s> </s>",
    " <s> leading and trailing ",
    "<unk>",
    "<s",
]


def train_vocab(texts: list[str]) -> tuple[list[str], list[float], list[int]]:
    """BPE over `▁`-prefixed words; characters seen once are left to byte fallback."""
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word in re.findall("▁[^▁]*", "▁" + text.replace(" ", "▁")):
            words[tuple(word)] += 1
    chars = Counter(c for w, n in words.items() for c in w for _ in range(n))
    base = sorted((c for c, n in chars.items() if n >= 2), key=lambda c: (-chars[c], c))
    merged: list[str] = []
    known = set(base)
    for _ in range(N_MERGES):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for a, b in itertools.pairwise(w):
                if a in known and b in known:
                    pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        new = a + b
        if new not in known:
            merged.append(new)
            known.add(new)
        rewritten: Counter[tuple[str, ...]] = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            rewritten[tuple(out)] += n
        words = rewritten
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    scores = [0.0] * len(tokens)
    types = [2, 3, 3, *[6] * 256]
    for i, piece in enumerate(merged):
        tokens.append(piece)
        scores.append(-float(i))
        types.append(1)
    for i, c in enumerate(base):
        tokens.append(c)
        scores.append(-float(len(merged) + i))
        types.append(1)
    return tokens, scores, types


def write_vocab_gguf(path: Path, tokens: list[str], scores: list[float], types: list[int]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    import llama_cpp
    from tokenizer_corpus import CODE, EMOJI, SCRIPTS, corpus

    tokens, scores, types = train_vocab(SCRIPTS + CODE + EMOJI)
    strings = [s for s in corpus() if len(s) <= 20_000] + SPECIAL_STRINGS
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spm.gguf"
        write_vocab_gguf(path, tokens, scores, types)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        ids = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in strings]
    data = {
        "generator": f"llama-cpp-python {llama_cpp.__version__}, Llama.tokenize(add_bos=False, "
        "special=True)",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "strings": strings,
        "ids": ids,
    }
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with open(OUT, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
        gz.write(payload)
    print(f"{OUT}: {len(tokens)} tokens, {len(strings)} strings, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
