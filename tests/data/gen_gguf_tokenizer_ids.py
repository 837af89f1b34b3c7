"""Regenerate `smollm2_llamacpp_ids.json.gz`: llama.cpp's token ids for a varied corpus.

The expected ids of `tests/test_hf_tokenizer.py` come from llama.cpp's own tokenizer (through
llama-cpp-python), run on the default model's GGUF. llama-cpp-python compiles for minutes, so it
is not a test dependency: build it once in a separate virtual environment and run this script
there (it needs only llama-cpp-python and the standard library):

    python -m venv /tmp/llamacpp-venv && . /tmp/llamacpp-venv/bin/activate
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF \
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
        pip install llama-cpp-python==0.3.36 gguf==0.19.0
    python tests/data/gen_gguf_tokenizer_ids.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

(AVX2 only: the AVX-512 build of /work/shared/peers.md dies with "Illegal instruction" on a
processor without AVX-512. Only the tokenizer runs, so the instruction set does not matter.)

(`python -c "from nucleus.assets import asset_path; print(asset_path('smollm2-135m-instruct'))"`
in the project's environment prints the GGUF's path.) The corpus is `tests/tokenizer_corpus.py`
plus the strings below, which exercise this vocabulary's own special tokens. Each string is
tokenized twice: with `special=True` (special-token text becomes its id, as in a rendered chat
template) and `special=False` (it stays text).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

OUT = HERE / "smollm2_llamacpp_ids.json.gz"

EXTRA = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<repo_name>nucleus<file_sep>src/main.py\nimport os<jupyter_code>x = 1<empty_output>",
    "<|im_end|><|im_end|> <|im_start|>",
    "<|im_end",
    "<|IM_END|>",
    " <|im_start|> ",
    "<|im_start|><|im_start|>user",
    "<gh_stars>100",
    "<issue_start><issue_comment><issue_closed>",
]


def strings() -> list[str]:
    from tokenizer_corpus import corpus

    return list(corpus()) + EXTRA


def main() -> None:
    import llama_cpp

    gguf = Path(sys.argv[1])
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    items = strings()
    with_special = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in items]
    as_text = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) for s in items]
    data = {
        "generator": f"llama-cpp-python {llama_cpp.__version__}, Llama.tokenize(add_bos=False)",
        "gguf": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "strings": items,
        "special": with_special,
        "no_special": [None if a == b else a for a, b in zip(as_text, with_special, strict=True)],
    }
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with open(OUT, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
        gz.write(payload)  # mtime 0 and no name: the same input gives the same bytes
    print(f"{OUT}: {len(items)} strings, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
