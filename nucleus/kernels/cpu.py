"""CPU kernels in C, compiled on first use and called through ctypes.

Hot paths torch does not cover well on the CPU:
- `paged_attention.c`: decode attention reading the paged KV cache in place (torch would first
  gather every sequence's blocks into a padded copy: `nucleus.attention.planned_attention`), and
  the store of new keys/values into their cache slots;
- `block_linear.c`: matrix products with GGUF Q8_0/Q4_0/Q4_1 weights kept as 8-bit integers in
  blocks of 32 (`BlockInt8Weight`), rebuilt exactly on the fly: a quarter of the bytes of the
  float32 matrix, which is what small decode batches are bound by;
- `elementwise.c`: RMSNorm, the SwiGLU gate and RoPE in one pass each.

They are plain C with OpenMP, built and loaded by `nucleus.kernels.library` (cached per source,
flags and CPU). Without a C compiler, or with `NUCLEUS_CPU_KERNELS=0`, nothing is built and the
torch paths run: same results, slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nucleus.kernels import library


def available() -> bool:
    """Whether the CPU kernels can run here (a C compiler, and not turned off): checked once, when
    a model's ops and attention backend are chosen (`nucleus.ops`, `nucleus.attention`)."""
    return library.load() is not None


def _paged_attention_call(kernel, q, cache_k, cache_v, out, *layout) -> None:
    """Call a paged attention kernel: the tensors, then `layout` (the kernel's own tables and
    counts), then the geometry both kernels share; raise if its scratch allocation failed."""
    _, n_heads, head_dim = q.shape
    _, block_size, n_kv_heads, _ = cache_k.shape
    if not (q.is_contiguous() and out.is_contiguous()):
        raise ValueError("the queries and the output must be contiguous")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    status = kernel(
        q.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        out.data_ptr(),
        *layout,
        n_heads,
        n_kv_heads,
        head_dim,
        block_size,
        1.0 / math.sqrt(head_dim),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch space")


def paged_decode_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """Attention of one query per sequence, `q (B, n_heads, hd)`, over its first
    `context_lens[b]` cached keys/values of one layer (`(num_blocks, block_size, n_kv, hd)`), found
    through `block_tables (B, width)`. Returns `(B, n_heads, hd)`."""
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    _paged_attention_call(
        library.require().paged_decode_attention_f32,
        q,
        cache_k,
        cache_v,
        out,
        tables.data_ptr(),
        tables.shape[1],
        lens.data_ptr(),
        q.shape[0],
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    chunks: torch.Tensor,
    block_tables: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Causal attention of prefill chunks, written into their rows of `out (T, n_heads, hd)`.

    Chunk `c` is `chunks[c] = (first flat row in q, query length, context length)`: its queries
    are the last positions of its context, whose keys/values (already in the cache) are found
    through `block_tables[c]`. `q (T, n_heads, hd)`; caches `(num_blocks, block_size, n_kv, hd)`.
    """
    chunks = chunks.to(torch.int64)
    starts, q_lens, context_lens = (chunks[:, i].contiguous() for i in range(3))
    tables = block_tables.to(torch.int64).contiguous()
    _paged_attention_call(
        library.require().paged_prefill_attention_f32,
        q.contiguous(),
        cache_k,
        cache_v,
        out,
        starts.data_ptr(),
        q_lens.data_ptr(),
        context_lens.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        chunks.shape[0],
    )


@dataclass
class BlockInt8Weight:
    """An `(N, K)` weight as `scale[n, k // 32] * q[n, k] + offset[n, k // 32]` with int8 `q`:
    GGUF's Q8_0, Q4_0 and Q4_1 tensors, unpacked. Their scales are float16 values, so the
    product is exact and each weight is rounded once, as the dequantizer rounds it. Stored in the kernel's layout, panels of 16
    rows, k-major inside: `q (N/16, K, 16)`, `scale`/`offset (N/16, K/32, 16)` (`pack`)."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    PANEL = 16
    BLOCK = 32

    @classmethod
    def pack(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> BlockInt8Weight:
        """From row-major `q (N, K)` int8 and `scale`/`offset (N, K/32)` float32."""
        n, k = q.shape
        if n % cls.PANEL or k % cls.BLOCK:
            raise ValueError(f"a ({n}, {k}) weight does not tile into panels of {cls.PANEL} rows")

        def panels(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // cls.PANEL, cls.PANEL, -1).transpose(1, 2).contiguous()

        return cls(panels(q.to(torch.int8)), panels(scale.float()), panels(offset.float()))

    @classmethod
    def concat(cls, parts: list[BlockInt8Weight]) -> BlockInt8Weight:
        """The matrices of `parts` stacked along their output rows (whole panels each)."""
        if len(parts) == 1:
            return parts[0]
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "offset")))

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0] * self.PANEL, self.q.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 `(N, K)` matrix, each value rounded once as `scale * q + offset`."""
        n, k = self.shape
        q = self.q.view(n // self.PANEL, k // self.BLOCK, self.BLOCK, self.PANEL).float()
        w = torch.addcmul(self.offset[:, :, None], self.scale[:, :, None], q)
        return w.view(n // self.PANEL, k, self.PANEL).transpose(1, 2).reshape(n, k)


def block_int8_linear(x: torch.Tensor, weight: BlockInt8Weight) -> torch.Tensor:
    """`x (..., K) @ W.T` for a block-int8 `W (N, K)`, float32: `F.linear(x, weight.dequantize())`
    up to summation order (leading dimensions kept, as `F.linear` keeps them)."""
    lib = library.require()
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {k}")
    if x.dim() != 2:
        return block_int8_linear(x.reshape(-1, k), weight).view(*x.shape[:-1], n)
    x = x.contiguous()
    y = x.new_empty(x.shape[0], n)
    status = lib.block_int8_linear_f32(
        x.data_ptr(),
        weight.q.data_ptr(),
        weight.scale.data_ptr(),
        weight.offset.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        k,
        n,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU linear kernel could not allocate its scratch space")
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x**2, -1) + eps) * weight` over the last dimension, in one pass."""
    out = torch.empty_like(x)
    dim = x.shape[-1]
    library.require().rms_norm_f32(
        x.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.numel() // dim,
        dim,
        eps,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of contiguous fused rows `(T, 2H)` holding `[gate | up]` -> `(T, H)`."""
    tokens, two_h = gate_up.shape
    if two_h % 2 or not gate_up.is_contiguous():
        raise ValueError(f"expected contiguous [gate | up] rows, got {tuple(gate_up.shape)}")
    out = gate_up.new_empty(tokens, two_h // 2)
    library.require().silu_mul_f32(
        gate_up.data_ptr(), out.data_ptr(), tokens, two_h // 2, torch.get_num_threads()
    )
    return out


def rotary_(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE in place on float32 `x (T, heads, hd)` by complex64 `freqs_cis (T, hd/2)`: each pair
    `(x[2i], x[2i+1])` times `freqs_cis[t, i]` as a complex product (torch's up to the last bit).
    Tokens may be strided (a view into fused Q/K/V rows); each token's heads must be contiguous."""
    tokens, heads, head_dim = x.shape
    if freqs_cis.shape != (tokens, head_dim // 2) or freqs_cis.dtype != torch.complex64:
        raise ValueError(f"freqs_cis {tuple(freqs_cis.shape)} does not fit x {tuple(x.shape)}")
    if x.stride(2) != 1 or x.stride(1) != head_dim or not freqs_cis.is_contiguous():
        raise ValueError("rotary_ needs each token's heads contiguous and a contiguous freqs_cis")
    library.require().rotary_f32(
        x.data_ptr(),
        freqs_cis.data_ptr(),
        tokens,
        x.stride(0),
        heads,
        head_dim,
        torch.get_num_threads(),
    )
    return x


def write_kv(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy `k`, `v (T, n_kv, hd)` (contiguous float32) into cache rows `slot_mapping (T,)` (int64)
    of one layer's `(num_blocks, block_size, n_kv, hd)` caches."""
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous int64")
    num_slots = cache_k.shape[0] * cache_k.shape[1]
    row = k.shape[1] * k.shape[2]
    status = library.require().write_kv_f32(
        k.data_ptr(),
        v.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        slot_mapping.data_ptr(),
        k.shape[0],
        row,
        num_slots,
    )
    if status != 0:
        raise IndexError(f"a KV slot is outside the cache's {num_slots} slots")
