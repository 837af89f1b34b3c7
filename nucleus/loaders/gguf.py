"""GGUF files (llama.cpp's format): metadata to `ModelConfig`, tensors dequantized to float.

The file is memory-mapped through `gguf.GGUFReader`; each tensor is dequantized straight from the
mapped bytes in chunks into its own output tensor, so the only full-size allocation is the result
(float32 tensors stored as F32 are returned as views of the mapping, not copied).

Q/K row order: llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.modify_tensors`)
permutes the rows of `attn_q`/`attn_k` from Hugging Face's rotate-half order into the interleaved
order ggml's RoPE (`mode = 0`) rotates: pairs `(2i, 2i+1)` of each head. That is Meta's order, the
one `nucleus.model` uses, so GGUF Q/K weights are returned as stored. `tests/loaders/test_gguf.py`
pins this against transformers (which undoes the permutation into HF order) on the default model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nucleus.config import ConfigError, ModelConfig, RopeScaling
from nucleus.kernels.cpu import BlockInt8Weight
from nucleus.loaders.errors import CheckpointError

__all__ = [
    "DEQUANTIZERS",
    "GGUFError",
    "config_from_gguf_metadata",
    "dequantize",
    "is_gguf_file",
    "load_gguf_checkpoint",
    "read_block_int8",
    "read_gguf_metadata",
]

GGUF_MAGIC = b"GGUF"


class GGUFError(CheckpointError):
    """A GGUF file nucleus cannot use; the message names the file and the problem."""


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Dequantization. Each function takes raw blocks as a uint8 tensor (n_blocks, type_size) and
# returns float32 (n_blocks, block_size). The arithmetic is done in float32 in the same order
# as `gguf.quants` (scale products first), so results are bit-identical to it.
# --------------------------------------------------------------------------------------------


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields (n, 2k) uint8 -> float32 (n, k)."""
    return raw.contiguous().view(torch.float16).float()


def _deq_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float32)


def _deq_f16(raw: torch.Tensor) -> torch.Tensor:
    return _f16(raw)


def _deq_bf16(raw: torch.Tensor) -> torch.Tensor:
    bits = raw.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32)


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: element j < 16 is the low nibble of byte j, j >= 16 the high one."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _deq_q8_0(raw: torch.Tensor) -> torch.Tensor:
    # block of 32: f16 scale d, then 32 int8 quants; x = q * d
    d = _f16(raw[:, :2])
    q = raw[:, 2:].contiguous().view(torch.int8).float()
    return q * d


def _deq_q4_0(raw: torch.Tensor) -> torch.Tensor:
    # block of 32: f16 scale d, 16 bytes of 4-bit quants; x = d * (q - 8)
    d = _f16(raw[:, :2])
    q = _nibbles_32(raw[:, 2:18]).to(torch.int8) - 8
    return d * q.float()


def _deq_q4_1(raw: torch.Tensor) -> torch.Tensor:
    # block of 32: f16 scale d, f16 minimum m, 16 bytes of 4-bit quants; x = d * q + m
    d = _f16(raw[:, :2])
    m = _f16(raw[:, 2:4])
    q = _nibbles_32(raw[:, 4:20]).float()
    return d * q + m


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins.

    Sub-blocks 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins). Sub-blocks 4-7: low nibble
    (scale) and high nibble (min) of bytes 8-11, with bits 4-5 taken from the top two bits of
    bytes 0-3 (scales) and 4-7 (mins).
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((a & 63, (c & 0x0F) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=-1)
    return sc, mn


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 8 sub-blocks of 32: each 32-byte group gives two sub-blocks, low then high."""
    g = qs.reshape(-1, 4, 1, 32)
    return torch.cat((g & 0x0F, g >> 4), dim=2).reshape(-1, 8, 32)


def _k_sub_block_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K header (f16 d, f16 dmin, 12 bytes of 6-bit scales/mins) -> per sub-block
    `d * scale` and `dmin * min`, each `(n, 8, 1)`."""
    n = raw.shape[0]
    sc, mn = _k_scales_mins(raw[:, 4:16])
    scale = (_f16(raw[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    minimum = (_f16(raw[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    return scale, minimum


def _deq_q4_k(raw: torch.Tensor) -> torch.Tensor:
    # super-block of 256: f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of 4-bit quants;
    # sub-block s (32 values): x = (d * sc[s]) * q - dmin * m[s]
    n = raw.shape[0]
    scale, minimum = _k_sub_block_scales(raw)
    q = _k_low_nibbles(raw[:, 16:144]).float()
    return (scale * q - minimum).reshape(n, 256)


_BIT_SHIFTS_8 = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)


def _deq_q5_k(raw: torch.Tensor) -> torch.Tensor:
    # super-block of 256: f16 d, f16 dmin, 12 bytes of scales/mins, 32 bytes of high bits,
    # 128 bytes of low nibbles; bit s of high-bit byte l is bit 4 of value l of sub-block s.
    n = raw.shape[0]
    scale, minimum = _k_sub_block_scales(raw)
    high = (raw[:, 16:48].reshape(n, 1, 32) >> _BIT_SHIFTS_8) & 1
    q = (_k_low_nibbles(raw[:, 48:176]) | (high << 4)).float()
    return (scale * q - minimum).reshape(n, 256)


_BIT_SHIFTS_Q6 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)


def _deq_q6_k(raw: torch.Tensor) -> torch.Tensor:
    # super-block of 256 in two halves of 128: 128 bytes of low nibbles, 64 bytes of 2-bit high
    # parts, 16 int8 scales (one per 16 values), f16 d; x = (d * scale) * (q - 32).
    # In a half, low byte l (< 64) gives values l (low nibble) and l + 64 (high nibble); high
    # byte l (< 32) gives bits 4-5 of values l, l + 32, l + 64, l + 96 (bits 0-1, 2-3, 4-5, 6-7).
    n = raw.shape[0]
    ql = raw[:, 0:128].reshape(n, 2, 64)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    scales = raw[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(raw[:, 208:210])
    low = torch.cat((ql & 0x0F, ql >> 4), dim=-1)  # (n, 2, 128)
    high = ((qh >> _BIT_SHIFTS_Q6) & 3).reshape(n, 2, 128)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
    scale = (d * scales).reshape(n, 16, 1)
    return (scale * q).reshape(n, 256)


def _int8_q8_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _f16(raw[:, :2]), torch.zeros(raw.shape[0], 1), raw[:, 2:].contiguous().view(torch.int8)


def _int8_q4_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = _nibbles_32(raw[:, 2:18]).to(torch.int8) - 8
    return _f16(raw[:, :2]), torch.zeros(raw.shape[0], 1), q


def _int8_q4_1(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _f16(raw[:, :2]), _f16(raw[:, 2:4]), _nibbles_32(raw[:, 4:20]).to(torch.int8)


# GGML types whose blocks of 32 are `scale * q + offset` with 8-bit q: name -> (bytes, unpacker
# returning scale (n, 1), offset (n, 1), q (n, 32)). Their dequantized values are exact either way.
BLOCK_INT8_TYPES: dict[str, tuple[int, Callable[[torch.Tensor], tuple]]] = {
    "Q8_0": (34, _int8_q8_0),
    "Q4_0": (18, _int8_q4_0),
    "Q4_1": (20, _int8_q4_1),
}


# GGML type name -> (block size in values, block size in bytes, dequantizer)
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "F32": (1, 4, _deq_f32),
    "F16": (1, 2, _deq_f16),
    "BF16": (1, 2, _deq_bf16),
    "Q8_0": (32, 34, _deq_q8_0),
    "Q4_0": (32, 18, _deq_q4_0),
    "Q4_1": (32, 20, _deq_q4_1),
    "Q4_K": (256, 144, _deq_q4_k),
    "Q5_K": (256, 176, _deq_q5_k),
    "Q6_K": (256, 210, _deq_q6_k),
}

# Blocks dequantized per step: bounds the temporaries to a few tens of MB whatever the tensor.
_CHUNK_VALUES = 1 << 21


def dequantize(
    raw: np.ndarray | torch.Tensor,
    type_name: str,
    shape: tuple[int, ...],
    *,
    out: torch.Tensor | None = None,
    progress: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Dequantize the raw bytes of one tensor of GGML type `type_name` to float32 `shape`.

    Args:
        raw: the tensor's bytes (any shape, uint8, or a float view for F32/F16/BF16 data).
        type_name: the GGML type name, e.g. "Q4_K".
        shape: the logical shape (PyTorch order: the last dimension is GGML's `ne[0]`).
        out: optional float32 output of `shape` (or any float dtype: values are cast into it).
        progress: called with the number of output bytes done after each chunk.

    Raises:
        KeyError: `type_name` is not in `DEQUANTIZERS` (callers check first and say which file).
    """
    block_values, block_bytes, fn = DEQUANTIZERS[type_name]
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.asarray(raw))
    data = data.reshape(-1).view(torch.uint8).reshape(-1, block_bytes)
    n_values = math.prod(shape)
    if data.shape[0] * block_values != n_values:
        raise ValueError(
            f"{type_name} data holds {data.shape[0] * block_values} values, shape {shape} needs "
            f"{n_values}"
        )
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(-1, block_values)
    step = max(1, _CHUNK_VALUES // block_values)
    for start in range(0, data.shape[0], step):
        stop = min(start + step, data.shape[0])
        flat[start:stop] = fn(data[start:stop])
        if progress is not None:
            progress((stop - start) * block_values * out.element_size())
    return out


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _reader_class() -> type:
    import gguf

    class _Reader(gguf.GGUFReader):
        """`GGUFReader` parsing a plain ndarray view of its memory map.

        The reader slices its `np.memmap` once per value while parsing the header (about a
        million slices for a 49k-token vocabulary), and a memmap slice is several times slower
        than an ndarray one; the view shares the same mapping, so nothing is copied.
        """

        @property
        def data(self) -> np.ndarray:
            return self._nucleus_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._nucleus_data = value.view(np.ndarray)

    return _Reader


def _open_reader(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not is_gguf_file(path):
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        # Copy-on-write mapping: tensors can be viewed as writable arrays without a copy, and
        # nothing is ever written back to the file.
        return _reader_class()(path, "c")
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise GGUFError(f"{path}: malformed or unsupported GGUF file ({e})") from None


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


# The last files' metadata, keyed by (path, size, mtime): the engine reads a GGUF's weights and
# then its tokenizer, and parsing a large vocabulary's metadata costs about a second.
_METADATA_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}
_METADATA_CACHE_SIZE = 2


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _metadata_from_reader(reader: Any, path: Path) -> dict[str, Any]:
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    key = _cache_key(path)
    _METADATA_CACHE.pop(key, None)
    _METADATA_CACHE[key] = metadata
    while len(_METADATA_CACHE) > _METADATA_CACHE_SIZE:
        del _METADATA_CACHE[next(iter(_METADATA_CACHE))]
    return dict(metadata)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (arrays as lists).

    Keys are GGUF's, e.g. `general.architecture`, `llama.block_count`, `tokenizer.ggml.tokens`,
    `tokenizer.chat_template`; the header counts appear as `GGUF.version` etc. The metadata of the
    last two files read (here or by `load_gguf_checkpoint`) is cached while they are unchanged.

    Raises:
        FileNotFoundError: no such file.
        GGUFError: not a GGUF file, or a malformed one.
    """
    path = Path(path)
    if path.is_file() and (cached := _METADATA_CACHE.get(_cache_key(path))) is not None:
        return dict(cached)  # a shallow copy: the lists inside are shared, do not mutate them
    return _metadata_from_reader(_open_reader(path), path)


def _rope_scaling_from_factors(
    factors: torch.Tensor, head_dim: int, theta: float, original_ctx: int, where: str
) -> RopeScaling | None:
    """Recover Llama 3.1 RoPE scaling from the `rope_freqs.weight` llama.cpp's converter writes.

    The converter stores, per rotated pair, the divisor ggml applies to the base frequency: 1 for
    short wavelengths, `factor` for long ones, and `1 / ((1 - s) / factor + s)` between, where
    `s = (orig_ctx / wavelen - low) / (high - low)`. `factor` is the largest divisor; `s` is linear
    in `orig_ctx / wavelen`, which gives `low` and `high` when two or more pairs lie in between
    (else the first of Llama's 1 and 4 and a grid of values that reproduces the file). The result
    is checked against the stored divisors.
    """
    from nucleus.model import rope_frequencies

    f = factors.double().reshape(-1)
    if f.numel() != head_dim // 2:
        raise GGUFError(
            f"{where}: rope_freqs.weight has {f.numel()} values, head_dim {head_dim} needs "
            f"{head_dim // 2}"
        )
    factor = float(f.max())
    if abs(factor - 1.0) < 1e-6 and float(f.min()) > 1 - 1e-6:
        return None
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    x = original_ctx * base / (2 * math.pi)  # orig_ctx / wavelen
    stored = base / f
    candidates = [(1.0, 4.0)]  # Llama 3.1 / 3.2
    between = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if int(between.sum()) >= 2:
        s = (factor / f[between] - 1) / (factor - 1)
        a, b = np.polyfit(x[between].numpy(), s.numpy(), 1)
        low = float(-b / a)
        candidates.insert(0, (round(low, 4), round(low + float(1 / a), 4)))
    else:  # too few pairs in the band to fit: any values that reproduce the file will do
        grid = [i / 4 for i in range(1, 65)]
        candidates += [(lo, hi) for lo in grid for hi in grid if hi > lo]
    for low, high in candidates:
        scaling = RopeScaling(
            factor=round(factor, 4),
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original_ctx,
        )
        expected = rope_frequencies(head_dim, theta, scaling).double()
        if torch.allclose(expected, stored, rtol=1e-3, atol=0):
            return scaling
    raise GGUFError(
        f"{where}: rope_freqs.weight is not Llama 3.1-style RoPE scaling (factor {factor:g}, "
        f"original context {original_ctx}: no low/high frequency factors reproduce it)"
    )


def config_from_gguf_metadata(
    metadata: dict[str, Any],
    *,
    vocab_size: int | None = None,
    tie_embeddings: bool = False,
    rope_factors: torch.Tensor | None = None,
    where: str = "GGUF",
) -> ModelConfig:
    """`ModelConfig` from GGUF metadata of a `llama` architecture model.

    Args:
        metadata: as returned by `read_gguf_metadata`.
        vocab_size: rows of `token_embd.weight` (default: `llama.vocab_size` or the token count).
        tie_embeddings: the file has no `output.weight`.
        rope_factors: the `rope_freqs.weight` tensor, if the file has one (Llama 3.1 scaling).
        where: the file name, for error messages.

    Raises:
        GGUFError: not a llama architecture, or a feature nucleus does not run (MoE, partial
            rotary, linear/YaRN RoPE scaling).
        ConfigError: missing or inconsistent hyperparameters.
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{where}: architecture {arch!r} is not a Llama architecture (nucleus runs GGUF files "
            "with general.architecture = 'llama')"
        )

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if required:
                raise ConfigError(f"{where}: missing required metadata key {full!r}")
            return default
        value = metadata[full]
        if isinstance(value, list):  # per-layer arrays: nucleus needs them uniform
            if not value or len(set(value)) != 1:
                raise GGUFError(f"{where}: per-layer {full} {value!r} is not supported")
            value = value[0]
        return value

    if get("expert_count", 0):
        raise GGUFError(
            f"{where}: a mixture-of-experts model ({arch}.expert_count = "
            f"{get('expert_count')}); nucleus runs dense Llama models only"
        )
    dim = int(get("embedding_length", required=True))
    n_heads = int(get("attention.head_count", required=True))
    n_kv_heads = int(get("attention.head_count_kv", n_heads) or n_heads)
    head_dim = int(get("attention.key_length", 0) or 0)
    value_dim = int(get("attention.value_length", 0) or 0)
    if value_dim and head_dim and value_dim != head_dim:
        raise GGUFError(f"{where}: key_length {head_dim} != value_length {value_dim}")
    effective_head_dim = head_dim or (dim // n_heads if n_heads else 0)
    rot_dims = get("rope.dimension_count")
    if rot_dims is not None and int(rot_dims) != effective_head_dim:
        raise GGUFError(
            f"{where}: partial rotary embeddings ({arch}.rope.dimension_count = {rot_dims}, "
            f"head_dim {effective_head_dim}) are not supported"
        )
    theta = float(get("rope.freq_base", 10000.0))
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise GGUFError(f"{where}: RoPE scaling type {scaling_type!r} is not supported")
    ctx = get("context_length")
    if vocab_size is None:
        vocab_size = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or [])
    scaling = None
    if rope_factors is not None:
        original_ctx = int(get("rope.scaling.original_context_length", 8192) or 8192)
        scaling = _rope_scaling_from_factors(
            rope_factors, effective_head_dim, theta, original_ctx, where
        )
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(get("block_count", required=True)),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=int(vocab_size),
            ffn_hidden_dim=int(get("feed_forward_length", required=True)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=tie_embeddings,
            head_dim=head_dim,
            max_position_embeddings=int(ctx) if ctx else None,
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------

_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
# Tensors some llama GGUFs carry that the model recomputes.
_SKIPPED = {"rope_freqs.weight"}


def meta_name(gguf_name: str) -> str | None:
    """The Meta name of a llama GGUF tensor, or None if the model has no such weight."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[1].isdigit()
        and parts[2] in _LAYER_NAMES
        and parts[3] == "weight"
    ):
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def load_gguf_checkpoint(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama GGUF file: its `ModelConfig` and its weights under Meta's names.

    Quantized tensors are dequantized from the memory-mapped file into `dtype` (float32 by
    default); F32 tensors are returned as views of the mapping when `dtype` is float32. A tied
    embedding (no `output.weight`) gives `tie_embeddings=True` and no `output.weight` entry. Q/K
    rows are returned as stored: llama.cpp's converter already wrote them in Meta's interleaved
    RoPE order. A progress bar is shown on stderr when loading takes more than a second.

    Raises:
        FileNotFoundError: no such file.
        GGUFError: not a GGUF file, not a llama architecture, a tensor of a GGML type nucleus
            cannot dequantize (named), or tensors that do not fit the architecture.
        ConfigError: missing or inconsistent hyperparameters.
    """
    path = Path(path)
    reader = _open_reader(path)
    metadata = _metadata_from_reader(reader, path)
    where = str(path)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        config_from_gguf_metadata(metadata, where=where)  # raises the architecture error

    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        if type_name not in DEQUANTIZERS:
            raise GGUFError(
                f"{where}: tensor {t.name!r} is of GGML type {type_name}, which nucleus cannot "
                f"dequantize (supported: {', '.join(DEQUANTIZERS)})"
            )
        if t.name not in _SKIPPED and meta_name(t.name) is None:
            raise GGUFError(f"{where}: unexpected tensor {t.name!r} for a llama model")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{where}: no token_embd.weight tensor")

    def shape_of(t: Any) -> tuple[int, ...]:
        # GGML lists dimensions fastest-first (ne[0] is the row length): reverse for PyTorch.
        return tuple(int(n) for n in reversed(t.shape.tolist()))

    rope_factors = None
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        rope_factors = dequantize(t.data, t.tensor_type.name, shape_of(t))
    config = config_from_gguf_metadata(
        metadata,
        vocab_size=shape_of(tensors["token_embd.weight"])[0],
        tie_embeddings="output.weight" not in tensors,
        rope_factors=rope_factors,
        where=where,
    )

    wanted = [t for t in reader.tensors if meta_name(t.name) is not None]
    total = sum(int(t.n_elements) for t in wanted) * torch.empty((), dtype=dtype).element_size()
    weights: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"loading {path.name}",
        file=sys.stderr,
        delay=1.0,  # shown only when loading takes more than a second
        leave=False,
        disable=None,  # and only on a terminal
    ) as bar:
        for t in wanted:
            shape = shape_of(t)
            type_name = t.tensor_type.name
            if type_name == "F32" and dtype == torch.float32:
                tensor = torch.from_numpy(t.data).reshape(shape)  # a view of the mapping
                bar.update(tensor.numel() * 4)
            else:
                out = torch.empty(shape, dtype=dtype)
                try:
                    tensor = dequantize(t.data, type_name, shape, out=out, progress=bar.update)
                except ValueError as e:
                    raise GGUFError(f"{where}: tensor {t.name!r}: {e}") from None
            weights[meta_name(t.name)] = tensor
    _check_shapes(config, weights, where)
    return config, weights


def read_block_int8(path: str | Path) -> dict[str, BlockInt8Weight]:
    """The matrices of a GGUF file stored as Q8_0, Q4_0 or Q4_1, unpacked to `BlockInt8Weight`
    under Meta's names: the CPU kernels multiply by them without the float32 copy."""
    path = Path(path)
    out = {}
    for t in _open_reader(path).tensors:
        name = meta_name(t.name)
        if name is None or t.tensor_type.name not in BLOCK_INT8_TYPES or len(t.shape) != 2:
            continue
        n, k = (int(d) for d in reversed(t.shape.tolist()))
        if n % BlockInt8Weight.PANEL:
            continue  # the kernel's panels do not tile it: the float32 matrix serves it
        block_bytes, unpack = BLOCK_INT8_TYPES[t.tensor_type.name]
        raw = torch.from_numpy(np.asarray(t.data)).reshape(-1).view(torch.uint8)
        scale, offset, q = unpack(raw.reshape(-1, block_bytes))
        out[name] = BlockInt8Weight.pack(
            q.reshape(n, k), scale.reshape(n, k // 32), offset.reshape(n, k // 32)
        )
    return out


def _check_shapes(config: ModelConfig, weights: dict[str, torch.Tensor], where: str) -> None:
    hd = config.head_dim
    expected = {
        "tok_embeddings.weight": (config.vocab_size, config.dim),
        "norm.weight": (config.dim,),
    }
    if not config.tie_embeddings:
        expected["output.weight"] = (config.vocab_size, config.dim)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        expected |= {
            p + "attention_norm.weight": (config.dim,),
            p + "ffn_norm.weight": (config.dim,),
            p + "attention.wq.weight": (config.n_heads * hd, config.dim),
            p + "attention.wk.weight": (config.n_kv_heads * hd, config.dim),
            p + "attention.wv.weight": (config.n_kv_heads * hd, config.dim),
            p + "attention.wo.weight": (config.dim, config.n_heads * hd),
            p + "feed_forward.w1.weight": (config.ffn_hidden_dim, config.dim),
            p + "feed_forward.w2.weight": (config.dim, config.ffn_hidden_dim),
            p + "feed_forward.w3.weight": (config.ffn_hidden_dim, config.dim),
        }
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise GGUFError(
            f"{where}: tensors do not match the metadata ({config.n_layers} layers): missing "
            f"{missing[:6]}, unexpected {extra[:6]}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise GGUFError(
                f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, the metadata "
                f"implies {shape}"
            )
