"""GGUF test files: random quantized blocks of every type nucleus reads, and small llama GGUFs
written with the `gguf` package's writer (llama.cpp's own), as llama.cpp's converter writes them."""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of the float16 scale fields in each block: random bytes there could be NaN/inf
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def random_blocks(
    type_name: str, n_blocks: int, seed: int, scale: float | None = None
) -> np.ndarray:
    """Random raw blocks: every quant bit pattern, scales finite float16 of varied magnitude (or
    normal of standard deviation `scale`)."""
    rng = np.random.default_rng(seed)
    block_bytes = gguf.GGML_QUANT_SIZES[Q[type_name]][1]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS.get(type_name, []):
        magnitude = 10.0 ** rng.integers(-6, 2, n_blocks) if scale is None else scale
        scales = (rng.standard_normal(n_blocks) * magnitude).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


DIM, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 256, 4, 2, 512, 300, 2
HEAD_DIM = DIM // HEADS


def _raw_for(type_name: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    rows, cols = shape
    if type_name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        raw = gguf.quants.quantize(values, Q[type_name])
        return raw if type_name != "F32" else values
    block_values = gguf.GGML_QUANT_SIZES[Q[type_name]][0]
    n_blocks = rows * cols // block_values
    seed = int(rng.integers(1 << 30))
    if type_name not in SUPPORTED:  # unsupported types: any bytes will do
        block_bytes = gguf.GGML_QUANT_SIZES[Q[type_name]][1]
        return np.zeros((rows, cols // block_values * block_bytes), dtype=np.uint8)
    # K-quant scales that give weights of a real model's size (about 0.05: random 6-bit
    # sub-block scales and 4-bit values times these): a model of them computes sanely
    return random_blocks(type_name, n_blocks, seed, scale=2e-4).reshape(rows, -1)


def write_llama_gguf(
    path,
    *,
    types: dict[str, str] | None = None,
    tied: bool = False,
    arch: str = "llama",
    rope_factors: np.ndarray | None = None,
    original_ctx: int | None = None,
) -> dict[str, tuple[np.ndarray, str]]:
    """A small llama GGUF; returns GGUF name -> (raw data, type) of every tensor written."""
    rng = np.random.default_rng(0)
    types = types or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    if original_ctx is not None:
        writer.add_rope_scaling_orig_ctx_len(original_ctx)
    shapes = {"token_embd.weight": (VOCAB, DIM), "output_norm.weight": (1, DIM)}
    if not tied:
        shapes["output.weight"] = (VOCAB, DIM)
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (1, DIM),
            f"blk.{i}.ffn_norm.weight": (1, DIM),
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, DIM),
            f"blk.{i}.attn_output.weight": (DIM, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, DIM),
            f"blk.{i}.ffn_down.weight": (DIM, FFN),
            f"blk.{i}.ffn_up.weight": (FFN, DIM),
        }
    written = {}
    for name, shape in shapes.items():
        type_name = types.get(name, "F32")
        raw = _raw_for(type_name, shape, rng)
        if shape[0] == 1:
            raw = raw.reshape(-1) if type_name == "F32" else raw.reshape(1, -1)
        if type_name == "F32":
            writer.add_tensor(name, raw)
        else:
            writer.add_tensor(name, raw, raw_dtype=Q[type_name])
        written[name] = (raw, type_name)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
