"""GGUF weights into torch: tensors dequantized to float, and the 8-bit block forms.

The file is opened by `nucleus.loaders.gguf_file` (metadata, config, tensors: no torch there);
each tensor is dequantized here straight from the mapped bytes in chunks into its own output
tensor, so the only full-size allocation is the result (float32 tensors stored as F32 are returned
as views of the mapping, not copied).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nucleus.config import ModelConfig
from nucleus.kernels.cpu import BlockInt8Weight
from nucleus.loaders.gguf_file import (
    GGUFError,
    GGUFFile,
    TensorInfo,
    config_from_gguf_metadata,
    is_gguf_file,
    meta_name,
    open_gguf,
    read_gguf_metadata,
)

__all__ = [
    "DEQUANTIZERS",
    "GGUFError",
    "GGUFWeights",
    "config_from_gguf_metadata",
    "dequantize",
    "is_gguf_file",
    "load_gguf_checkpoint",
    "meta_name",
    "read_block_int8",
    "read_gguf_metadata",
]


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


def load_gguf_checkpoint(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama GGUF file: its `ModelConfig` and its weights under Meta's names.

    Quantized tensors are dequantized from the memory-mapped file into `dtype` (float32 by
    default); F32 tensors are returned as views of the mapping when `dtype` is float32. A tied
    embedding (no `output.weight`) gives `tie_embeddings=True` and no `output.weight` entry. Q/K
    rows are returned as stored: llama.cpp's converter already wrote them in Meta's interleaved
    RoPE order. A progress bar is shown on stderr when loading takes more than a second.

    Raises what `nucleus.loaders.gguf_file.open_gguf` raises.
    """
    file = open_gguf(path)
    total = sum(int(t.n_elements) for t in file.tensors.values())
    total *= torch.empty((), dtype=dtype).element_size()
    weights: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"loading {file.path.name}",
        file=sys.stderr,
        delay=1.0,  # shown only when loading takes more than a second
        leave=False,
        disable=None,  # and only on a terminal
    ) as bar:
        for name, t in file.tensors.items():
            weights[name] = _tensor(file, name, t, dtype, bar.update)
    return file.config, weights


def _tensor(
    file: GGUFFile, name: str, t: TensorInfo, dtype: torch.dtype, progress: Callable[[int], Any]
) -> torch.Tensor:
    """One reader tensor as a torch tensor of `dtype`: a view of the mapping for F32 into float32,
    else dequantized into a new tensor."""
    shape, type_name = t.shape, t.type_name
    if type_name == "F32" and dtype == torch.float32:
        progress(math.prod(shape) * 4)
        return torch.from_numpy(t.raw.view(np.float32)).reshape(shape)
    try:
        out = torch.empty(shape, dtype=dtype)
        return dequantize(t.raw, type_name, shape, out=out, progress=progress)
    except ValueError as e:
        raise GGUFError(f"{file.path}: tensor {t.name!r} ({name}): {e}") from None


class GGUFWeights(Mapping[str, torch.Tensor]):
    """The tensors of an opened GGUF file under Meta's names, each dequantized to float32 when it
    is read (F32 ones are views of the mapping): `build_transformer` reads each once, as it
    places it, and never reads the matrices it keeps in block form. `shapes` needs no reading."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file
        self.shapes = {name: t.shape for name, t in file.tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return _tensor(self.file, name, self.file.tensors[name], torch.float32, lambda _: None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file.tensors)

    def __len__(self) -> int:
        return len(self.file.tensors)


def read_block_int8(file: GGUFFile | str | Path) -> dict[str, BlockInt8Weight]:
    """The matrices of a GGUF file stored as Q8_0, Q4_0 or Q4_1, unpacked to `BlockInt8Weight`
    under Meta's names: the CPU kernels multiply by them without the float32 copy."""
    if not isinstance(file, GGUFFile):
        file = open_gguf(file)
    out = {}
    for name, t in file.tensors.items():
        if t.type_name not in BLOCK_INT8_TYPES or len(t.shape) != 2:
            continue
        n, k = t.shape
        if n % BlockInt8Weight.PANEL:
            continue  # the kernel's panels do not tile it: the float32 matrix serves it
        block_bytes, unpack = BLOCK_INT8_TYPES[t.type_name]
        scale, offset, q = unpack(torch.from_numpy(t.raw).reshape(-1, block_bytes))
        out[name] = BlockInt8Weight.pack(
            q.reshape(n, k), scale.reshape(n, k // 32), offset.reshape(n, k // 32)
        )
    return out
