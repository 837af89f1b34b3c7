"""The 8-bit-activation matrix products of `nucleus/kernels/quantized.c`, beside their torch twin.

Oracles:
- the twin (below, in torch): llama.cpp's activation quantization (its Q8_0/Q8_1 for blocks of
  32, with float16-rounded scales; its Q8_K for the K-quants), then the block sums in float64
  from the exact integers. The C activations must equal the twin's bit for bit, and the C
  products the twin's up to float32 summation: (blocks + 2) * 2^-24 of the sum of |block terms|;
- `gguf.quants` (llama.cpp's own Python package), through `nucleus.loaders.gguf.dequantize`, for
  the weights: the C dequantization (of the interleaved layout too) equals it bit for bit;
- the float64 product of the dequantized weights and the float32 activations: the C products are
  within the error bound `quantized.c` states (docs/cpu.md) and no further.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf_files import random_blocks

from nucleus.cpu.model import TYPE_IDS, as_matrix, dequantize_rows, linear
from nucleus.kernels import library
from nucleus.loaders.gguf import BLOCK_INT8_TYPES, _k_sub_block_scales, dequantize

TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
FLOAT_TYPES = ["F32", "F16", "BF16"]
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}

ACT32 = np.dtype([("q", "i1", 32), ("d", "<f4"), ("s", "<f4"), ("sum", "<i4")])
ACT256 = np.dtype([("d", "<f4"), ("bsums", "<i2", 16), ("q", "i1", 256)])


def weights(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random GGUF blocks of a (rows, cols) matrix, scales of a real model's size."""
    if type_name in FLOAT_TYPES:
        values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
        if type_name == "F32":
            return values.view(np.uint8)
        if type_name == "F16":
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    n_blocks = rows * cols // BLOCK[type_name]
    return random_blocks(type_name, n_blocks, seed, scale=0.02).reshape(rows, -1)


# ---- the torch twin ---------------------------------------------------------------------------


def quantize_32(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """llama.cpp's quantize_row_q8_0/q8_1: q, d (float16-rounded), s = fp16(d * sum q), sum q."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1)
    d = amax / 127
    inv = torch.where(amax != 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])
    total = q.sum(-1)
    return q.to(torch.int8), d.half().float(), (d * total).half().float(), total.int()


def quantize_256(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """llama.cpp's quantize_row_q8_K: the value of largest magnitude becomes -127."""
    xb = x.reshape(x.shape[0], -1, 256)
    biggest = xb.gather(-1, xb.abs().argmax(-1, keepdim=True)).squeeze(-1)
    zero = biggest == 0
    iscale = torch.where(zero, torch.ones_like(biggest), -127 / biggest)
    q = torch.round(iscale[..., None] * xb).clamp(max=127).masked_fill(zero[..., None], 0)
    d = torch.where(zero, torch.zeros_like(iscale), 1 / iscale)
    return q.to(torch.int8), d, q.reshape(*q.shape[:2], 16, 16).sum(-1).short()


def twin_product(type_name: str, raw: np.ndarray, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y, scale): the product through 8-bit activations in float64 from the exact integer block
    sums, and per output the sum over blocks of the |parts| float32 adds (a block's scaled sum,
    and apart from it the minimums' part), which bounds float32's summation error."""
    rows = raw.shape[0]
    if type_name in FLOAT_TYPES:
        w = dequantize(raw, type_name, (rows, x.shape[1])).double()
        return x.double() @ w.T, x.double().abs() @ w.abs().T
    if BLOCK[type_name] == 32:
        q, d, s, _ = quantize_32(x)
        unpack = BLOCK_INT8_TYPES[type_name][1]
        wd, wm, wq = unpack(torch.from_numpy(raw).reshape(-1, BYTES[type_name]))
        nb = q.shape[1]
        wq, wd, wm = wq.reshape(rows, nb, 32), wd.reshape(rows, nb), wm.reshape(rows, nb)
        sums = torch.einsum("mbj,nbj->mnb", q.double(), wq.double())
        scaled = sums * (wd.double()[None] * d.double()[:, None])
        minimums = wm.double()[None] * s.double()[:, None]  # Q4_1's (else 0)
        return (scaled + minimums).sum(-1), (scaled.abs() + minimums.abs()).sum(-1)
    # K-quants: the dequantizer's weights are the exact d * scale * q - dmin * min (Q6_K:
    # d * scale * (q - 32)); the kernel sums the two parts apart.
    q, d, _ = quantize_256(x)
    xq = (q.double() * d.double()[..., None]).reshape(x.shape[0], -1)
    w = dequantize(raw, type_name, (rows, x.shape[1])).double()
    blocks = torch.from_numpy(raw).reshape(-1, BYTES[type_name])
    if type_name == "Q6_K":
        step = blocks[:, 192:208].contiguous().view(torch.int8).double()
        step = step * blocks[:, 208:210].contiguous().view(torch.float16).double()
        part = (32 * step).abs().repeat_interleave(16, dim=1)
    else:
        part = _k_sub_block_scales(blocks)[1].double().abs().expand(-1, 8, 32)
    part = part.reshape(rows, -1)
    return xq @ w.T, xq.abs() @ (w.abs() + 2 * part).T


def error_bound(type_name: str, raw: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """The bound quantized.c states for |y - x @ W.T| (W dequantized, x float32)."""
    rows, cols = raw.shape[0], x.shape[1]
    w = dequantize(raw, type_name, (rows, cols)).double()
    block = BLOCK[type_name]
    xb = x.double().reshape(x.shape[0], -1, block)
    d = xb.abs().amax(-1) / 127  # the activation block's step
    wabs = w.abs().reshape(rows, -1, block).sum(-1)  # (N, nb)
    if block == 32:  # plus the float16 rounding of the step (absolute below float16's normals)
        step = d / 2 + 127 * torch.maximum(d * 2**-11, torch.full_like(d, 2**-25))
    else:
        step = d / 2
    bound = step @ wabs.T
    if type_name == "Q4_1":
        *_, total = quantize_32(x)
        m = BLOCK_INT8_TYPES["Q4_1"][1](torch.from_numpy(raw).reshape(-1, 20))[1].reshape(rows, -1)
        slack = torch.maximum(d * 2**-10, torch.full_like(d, 2**-24)) * total.double().abs()
        bound = bound + slack @ m.double().abs().T
    # and float32 rounding of the sums
    return bound + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30


# ---- the kernels ------------------------------------------------------------------------------


def c_activations(type_name: str, x: np.ndarray) -> np.ndarray:
    m, k = x.shape
    dtype = ACT32 if BLOCK[type_name] == 32 else ACT256
    out = np.zeros((m, k // BLOCK[type_name]), dtype=dtype)
    library.require().quantize_activations_f32(
        TYPE_IDS[type_name], x.ctypes.data, m, k, out.ctypes.data
    )
    return out


def c_product(type_name: str, raw: np.ndarray, x: np.ndarray, threads: int = 2) -> np.ndarray:
    matrix, _keep = as_matrix(type_name, raw, raw.shape[0], x.shape[1])
    out = np.empty((x.shape[0], raw.shape[0]), dtype=np.float32)
    return linear(matrix, x, out, threads)


def activations(m: int, k: int, seed: int) -> np.ndarray:
    """Varied magnitudes per block, exact zeros in one block, ties at .5 steps in another."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x *= (10.0 ** rng.integers(-3, 3, (m, k // 32))).repeat(32, axis=1).astype(np.float32)
    x[0, :32] = 0
    x[-1, 32:64] = np.arange(32, dtype=np.float32) - 15.5  # x * 127 / 16.5 hits no ties, but
    x[-1, 64:96] = np.linspace(-127, 127, 32, dtype=np.float32)  # these round exactly
    return x


@pytest.mark.parametrize("type_name", TYPES)
def test_activations_quantize_as_llama_cpp_does(type_name):
    x = activations(5, 512, seed=1)
    ours = c_activations(type_name, x)
    xt = torch.from_numpy(x)
    if BLOCK[type_name] == 32:
        q, d, s, total = quantize_32(xt)
        assert np.array_equal(ours["q"], q.numpy())
        assert np.array_equal(ours["d"], d.numpy())
        assert np.array_equal(ours["s"], s.numpy())
        assert np.array_equal(ours["sum"], total.numpy())
    else:
        q, d, bsums = quantize_256(xt)
        assert np.array_equal(ours["q"], q.numpy())
        assert np.array_equal(ours["d"], d.numpy())
        assert np.array_equal(ours["bsums"], bsums.numpy())


@pytest.mark.parametrize("type_name", TYPES + FLOAT_TYPES)
@pytest.mark.parametrize(("m", "n"), [(1, 64), (3, 40), (7, 24), (33, 16)])
def test_product_equals_the_twin(type_name, m, n):
    k = 512
    raw = weights(type_name, n, k, seed=m * n)
    x = activations(m, k, seed=m)
    ours = torch.from_numpy(c_product(type_name, raw, x)).double()
    y, scale = twin_product(type_name, raw, torch.from_numpy(x))
    nb = k // BLOCK.get(type_name, 1)
    assert ((ours - y).abs() <= (nb + 2) * 2**-24 * scale + 1e-30).all()


@pytest.mark.parametrize("type_name", TYPES)
def test_product_is_within_the_stated_bound_of_float_activations(type_name):
    k, n = 1024, 48
    raw = weights(type_name, n, k, seed=3)
    x = activations(9, k, seed=4)
    ours = torch.from_numpy(c_product(type_name, raw, x)).double()
    exact = torch.from_numpy(x).double() @ dequantize(raw, type_name, (n, k)).double().T
    bound = error_bound(type_name, raw, torch.from_numpy(x))
    assert ((ours - exact).abs() <= bound).all()
    # and the bound is not loose by orders of magnitude: the worst output uses a good part of it
    assert ((ours - exact).abs() / bound).max() > 0.05


@pytest.mark.parametrize("type_name", TYPES + FLOAT_TYPES)
def test_dequantized_rows_equal_the_dequantizer(type_name):
    rows, k = 19, 512  # 19: the interleaved layout's last group of 8 is partial
    raw = weights(type_name, rows, k, seed=7)
    matrix, _keep = as_matrix(type_name, raw, rows, k)
    ours = dequantize_rows(matrix, range(rows))
    ref = dequantize(raw, type_name, (rows, k)).numpy()
    assert np.array_equal(ours.view(np.int32), ref.view(np.int32))


def test_rows_that_do_not_fill_a_group_of_eight_are_multiplied_too():
    raw = weights("Q4_1", 13, 256, seed=9)
    x = activations(2, 256, seed=9)
    y, scale = twin_product("Q4_1", raw, torch.from_numpy(x))
    ours = torch.from_numpy(c_product("Q4_1", raw, x)).double()
    assert ((ours - y).abs() <= 10 * 2**-24 * scale).all()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_a_nan_activation_gives_nan_outputs(type_name):
    raw = weights(type_name, 16, 512, seed=2)
    x = activations(3, 512, seed=2)
    x[1, 300] = np.nan
    y = c_product(type_name, raw, x)
    assert np.isnan(y[1]).all()
    assert np.isfinite(y[[0, 2]]).all()


def test_threads_do_not_change_the_result():
    raw = weights("Q8_0", 64, 512, seed=5)
    x = activations(6, 512, seed=5)
    assert np.array_equal(c_product("Q8_0", raw, x, 1), c_product("Q8_0", raw, x, 2))


def test_an_unsupported_type_is_refused():
    matrix, _keep = as_matrix("F32", weights("F32", 8, 64, seed=0), 8, 64)
    matrix.type = 6  # Q5_0
    with pytest.raises(ValueError, match="cannot multiply a matrix of GGML type 6"):
        linear(matrix, np.zeros((1, 64), np.float32), np.empty((1, 8), np.float32), 1)
    assert ctypes.sizeof(matrix) == 32


@pytest.mark.parametrize(
    "flags", [["-march=x86-64"], ["-march=haswell"]], ids=["portable C", "AVX2 without VNNI"]
)
def test_other_instruction_sets_compute_the_same_products(flags, tmp_path):
    """The scalar code and the AVX2 code without VNNI (llama.cpp's maddubs path, the AMD EPYC
    machines') are checked here too, built apart with those flags."""
    import subprocess

    from nucleus.cpu.model import Matrix

    so = tmp_path / "kernels.so"
    base = [f for f in library.FLAGS if not f.startswith("-march")]
    subprocess.run(
        ["cc", *base, *flags, *map(str, library.SOURCES), "-o", str(so), "-lm"],
        check=True,
        capture_output=True,
    )
    other = ctypes.CDLL(str(so))
    for name in ("repacked_bytes", "repack_rows8", "quantized_linear_f32"):
        getattr(other, name).argtypes, getattr(other, name).restype = library._SIGNATURES[name]
    for type_name in TYPES:
        raw = weights(type_name, 24, 512, seed=11)
        x = activations(5, 512, seed=11)
        data = raw
        if BLOCK[type_name] == 32:
            data = np.empty(other.repacked_bytes(TYPE_IDS[type_name], 24, 512), np.uint8)
            other.repack_rows8(TYPE_IDS[type_name], raw.ctypes.data, 24, 512, data.ctypes.data)
        matrix = Matrix(data.ctypes.data, TYPE_IDS[type_name], 24, 512)
        out = np.empty((5, 24), dtype=np.float32)
        assert (
            other.quantized_linear_f32(
                ctypes.addressof(matrix), x.ctypes.data, 5, out.ctypes.data, 2
            )
            == 0
        )
        y, scale = twin_product(type_name, raw, torch.from_numpy(x))
        assert ((torch.from_numpy(out).double() - y).abs() <= 20 * 2**-24 * scale).all(), type_name
