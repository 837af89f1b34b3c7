"""GGUF files (llama.cpp's format), without torch: the reader, metadata, `ModelConfig`, tensors.

`open_gguf` memory-maps a file through `gguf.GGUFReader`, parses its metadata into a
`ModelConfig` and lists its tensors under Meta's names, checked against the config. Two loaders
build on it: `nucleus.loaders.gguf` dequantizes the tensors into a torch `Transformer`, and
`nucleus.cpu.model` multiplies them as they are in the file, through the C forward pass.

Q/K row order: llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.modify_tensors`)
permutes the rows of `attn_q`/`attn_k` from Hugging Face's rotate-half order into the interleaved
order ggml's RoPE (`mode = 0`) rotates: pairs `(2i, 2i+1)` of each head. That is Meta's order, the
one `nucleus.model` uses, so GGUF Q/K weights are used as stored. `tests/loaders/test_gguf.py`
pins this against transformers (which undoes the permutation into HF order) on the default model.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucleus.config import ConfigError, ModelConfig, RopeScaling
from nucleus.loaders.errors import CheckpointError

GGUF_MAGIC = b"GGUF"

# The GGML types nucleus reads: each is dequantized by `nucleus.loaders.gguf` and multiplied as it
# is by the C kernels (`nucleus/kernels/quantized.c`).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


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
# Metadata
# --------------------------------------------------------------------------------------------


# GGUF value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8"}
_NUMPY |= {11: "<i8", 12: "<f8"}

# GGML type id -> (name, values per block, bytes per block): sizes for the types nucleus reads,
# names for all (to name them in errors).
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
_OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K"}
_OTHER_TYPES |= {16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL"}
_OTHER_TYPES |= {21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32"}
_OTHER_TYPES |= {27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


@dataclass
class TensorInfo:
    """One tensor of a GGUF file: its name, GGML type, shape in PyTorch order (GGML lists
    dimensions fastest-first) and raw bytes (a view of the file's memory map)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8
    mapping: mmap.mmap = field(repr=False)
    offset: int = 0  # of `raw` in the file

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def release(self) -> None:
        """Drop this tensor's pages from the process (a caller that copied it into a form of its
        own): they cost memory no more, and would be read from the file again if used."""
        page = mmap.PAGESIZE
        start = -(-self.offset // page) * page
        end = (self.offset + self.raw.nbytes) // page * page
        if end > start:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Header:
    """A cursor over the bytes of a GGUF header (little-endian)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        value = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return value

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.scalar("I"), self.scalar("Q")
        if item in _NUMPY:  # numbers: one view of the bytes
            dtype = np.dtype(_NUMPY[item])
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise ValueError("an array runs past the end of the file")
            values = np.frombuffer(self.buf[self.pos : end], dtype=dtype).tolist()
            self.pos = end
            return values
        if item == _STRING:  # the vocabulary and merges: one tight loop
            buf, pos, length = self.buf, self.pos, _U64.unpack_from
            values = []
            for _ in range(count):
                (n,) = length(buf, pos)
                values.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
            if pos > len(buf):
                raise ValueError("an array runs past the end of the file")
            self.pos = pos
            return values
        return [self.value(item) for _ in range(count)]


def _parse(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata and tensors of a GGUF file (versions 2 and 3, little-endian).

    A direct parser: `gguf.GGUFReader` builds a field object per metadata value, about a second
    for a 49k-token vocabulary, where this takes tens of milliseconds. The tensors' bytes are
    views of one private (copy-on-write) memory map: torch can view them as writable arrays
    without a copy, and nothing is ever written back to the file.
    """
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(mapping, dtype=np.uint8)
    h = _Header(memoryview(data))
    if h.scalar("4s") != GGUF_MAGIC:
        raise ValueError("no GGUF magic")
    version = h.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (nucleus reads versions 2 and 3, little-endian)")
    n_tensors, n_kv = h.scalar("Q"), h.scalar("Q")
    metadata: dict[str, Any] = {
        "GGUF.version": version,
        "GGUF.tensor_count": n_tensors,
        "GGUF.kv_count": n_kv,
    }
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        dims = [h.scalar("Q") for _ in range(h.scalar("I"))]
        infos.append((name, dims, h.scalar("I"), h.scalar("Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-h.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in infos:
        name_only = (_OTHER_TYPES.get(type_id, f"type {type_id}"), 0, 0)
        type_name, block_values, block_bytes = GGML_TYPES.get(type_id, name_only)
        shape = tuple(int(d) for d in reversed(dims))
        size = math.prod(shape) // block_values * block_bytes if block_values else 0
        if start + offset + size > len(data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        raw = data[start + offset : start + offset + size]
        tensors.append(TensorInfo(name, type_name, shape, raw, mapping, start + offset))
    return metadata, tensors


def _read(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not is_gguf_file(path):
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        metadata, tensors = _parse(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
        raise GGUFError(f"{path}: malformed or unsupported GGUF file ({e})") from None
    _remember(path, metadata)
    return dict(metadata), tensors


# The last files' metadata, keyed by (path, size, mtime): the engine reads a GGUF's weights and
# then its tokenizer.
_METADATA_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}
_METADATA_CACHE_SIZE = 2


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _remember(path: Path, metadata: dict[str, Any]) -> None:
    key = _cache_key(path)
    _METADATA_CACHE.pop(key, None)
    _METADATA_CACHE[key] = metadata
    while len(_METADATA_CACHE) > _METADATA_CACHE_SIZE:
        del _METADATA_CACHE[next(iter(_METADATA_CACHE))]


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
    return _read(path)[0]


def base_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """RoPE's per-pair frequencies `theta ** (-2i / head_dim)`, float64."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _rope_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, original_ctx: int, where: str
) -> RopeScaling | None:
    """Recover Llama 3.1 RoPE scaling from the `rope_freqs.weight` llama.cpp's converter writes.

    The converter stores, per rotated pair, the divisor ggml applies to the base frequency: 1 for
    short wavelengths, `factor` for long ones, and `1 / ((1 - s) / factor + s)` between, where
    `s = (orig_ctx / wavelen - low) / (high - low)`. `factor` is the largest divisor; `s` is linear
    in `orig_ctx / wavelen`, which gives `low` and `high` when two or more pairs lie in between
    (else the first of Llama's 1 and 4 and a grid of values that reproduces the file). The result
    is checked against the stored divisors.
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.size != head_dim // 2:
        raise GGUFError(
            f"{where}: rope_freqs.weight has {f.size} values, head_dim {head_dim} needs "
            f"{head_dim // 2}"
        )
    factor = float(f.max())
    if abs(factor - 1.0) < 1e-6 and float(f.min()) > 1 - 1e-6:
        return None
    base = base_frequencies(head_dim, theta)
    x = original_ctx * base / (2 * math.pi)  # orig_ctx / wavelen
    stored = base / f
    candidates = [(1.0, 4.0)]  # Llama 3.1 / 3.2
    between = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    if int(between.sum()) >= 2:
        s = (factor / f[between] - 1) / (factor - 1)
        a, b = np.polyfit(x[between], s, 1)
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
        if np.allclose(scaling.apply(base, np.where), stored, rtol=1e-3, atol=0):
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
    rope_factors: np.ndarray | None = None,
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


def check_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """The tensors (Meta name -> shape in PyTorch order) are exactly those the config implies."""
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
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise GGUFError(
            f"{where}: tensors do not match the metadata ({config.n_layers} layers): missing "
            f"{missing[:6]}, unexpected {extra[:6]}"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise GGUFError(
                f"{where}: tensor {name} has shape {tuple(shapes[name])}, the metadata "
                f"implies {shape}"
            )


@dataclass
class GGUFFile:
    """A GGUF file opened by `open_gguf`: its metadata and config, and its tensors (views of the
    file's memory map) under Meta's names."""

    path: Path
    metadata: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, TensorInfo]  # by Meta name
    rope_factors: np.ndarray | None  # `rope_freqs.weight`: the divisors of the base frequencies


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a llama GGUF file: its metadata, `ModelConfig` and tensors, all checked.

    A tied embedding (no `output.weight`) gives `tie_embeddings=True` and no `output.weight` entry.

    Raises:
        FileNotFoundError: no such file.
        GGUFError: not a GGUF file, not a llama architecture, a tensor of a GGML type nucleus
            cannot read (named), or tensors that do not fit the architecture.
        ConfigError: missing or inconsistent hyperparameters.
    """
    path = Path(path)
    metadata, infos = _read(path)
    where = str(path)
    if metadata.get("general.architecture") != "llama":
        config_from_gguf_metadata(metadata, where=where)  # raises the architecture error
    by_name = {t.name: t for t in infos}
    for t in infos:
        if t.type_name not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{where}: tensor {t.name!r} is of GGML type {t.type_name}, which nucleus "
                f"cannot dequantize (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if t.name not in _SKIPPED and meta_name(t.name) is None:
            raise GGUFError(f"{where}: unexpected tensor {t.name!r} for a llama model")
    if "token_embd.weight" not in by_name:
        raise GGUFError(f"{where}: no token_embd.weight tensor")
    rope_factors = None
    if "rope_freqs.weight" in by_name:
        t = by_name["rope_freqs.weight"]
        if t.type_name != "F32":
            raise GGUFError(f"{where}: rope_freqs.weight is {t.type_name}, not F32")
        rope_factors = t.raw.view(np.float32)
    config = config_from_gguf_metadata(
        metadata,
        vocab_size=by_name["token_embd.weight"].shape[0],
        tie_embeddings="output.weight" not in by_name,
        rope_factors=rope_factors,
        where=where,
    )
    tensors = {meta_name(t.name): t for t in infos if meta_name(t.name) is not None}
    check_shapes(config, {name: t.shape for name, t in tensors.items()}, where)
    return GGUFFile(path, metadata, config, tensors, rope_factors)
