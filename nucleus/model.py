"""The Llama transformer: RMSNorm, RoPE (with Llama 3.1 scaling), GQA attention, SwiGLU.

One model for every path. It follows Meta's `llama/model.py` in names, weight layout and the
order of its floating-point operations; what differs is the batch: a flat run of tokens with their
positions, attending through a paged KV cache (`nucleus.attention`). On the CPU in float32, matrix
products with GGUF 8-bit block weights, RMSNorm and the SwiGLU gate run in `nucleus.kernels`: the
same formulas, float32 summation order aside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nucleus.attention import AttentionMetadata, KVCache, paged_attention, write_kv
from nucleus.config import ModelConfig, RopeScaling
from nucleus.kernels import cpu as cpu_kernels
from nucleus.kernels.cpu import BlockInt8Weight


def linear(
    x: torch.Tensor, weight: torch.Tensor, block_int8: BlockInt8Weight | None
) -> torch.Tensor:
    """`x @ weight.T`, through the CPU block-int8 kernel when the weight has that form (the same
    values from a quarter of the bytes)."""
    if block_int8 is not None and cpu_kernels.block_linear_available(x):
        return cpu_kernels.block_int8_linear(x, block_int8)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free `nn.Linear` that may also hold its weight as GGUF 8-bit blocks (`block_int8`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.block_int8: BlockInt8Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.block_int8)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.elementwise_available(x, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)  # the same formula, one pass
        # Statistics in float32, cast back to the input dtype before the weight, as the reference.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies in float32; `scaling` is Llama 3.1's `apply_scaling`."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return freqs
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs `(x[2i], x[2i+1])` of `x (T, heads, hd)` as complex numbers by
    `freqs_cis (T, hd/2)`, in float32: the reference's `apply_rotary_emb`. May rotate `x` in
    place (the CPU kernel): callers pass a temporary."""
    if cpu_kernels.rotary_available(x, freqs_cis):
        return cpu_kernels.rotary_(x, freqs_cis)  # the same products, one pass
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(1)).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = apply_rotary(self.wq(x).view(tokens, self.n_heads, self.head_dim), freqs_cis)
        k = apply_rotary(self.wk(x).view(tokens, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(tokens, self.n_kv_heads, self.head_dim)
        write_kv(cache_k, cache_v, k, v, meta.slot_mapping)
        out = paged_attention(q, cache_k, cache_v, meta)
        return self.wo(out.reshape(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if cpu_kernels.elementwise_available(gate, up):
            return self.w2(cpu_kernels.silu_mul(gate, up))  # the same formula, one pass
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs_cis, cache_k, cache_v, meta) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, cache_k, cache_v, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """`forward(tokens (T,), positions (T,), kv, meta) -> hidden (T, dim)`; then `compute_logits`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else Linear(config.dim, config.vocab_size)
        self.register_buffer(
            "rope_freqs",
            rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
            persistent=False,
        )
        self.lm_head_block_int8: BlockInt8Weight | None = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def attach_block_int8(self, weights: dict[str, BlockInt8Weight]) -> None:
        """Give each projection (and the output head, tied or not) the 8-bit block form of its
        weight, keyed by state-dict name, checked against the float32 weight's shape."""
        head = "tok_embeddings.weight" if self.output is None else "output.weight"
        for name, packed in weights.items():
            owner = self.get_submodule(name.removesuffix(".weight"))
            if packed.shape != tuple(owner.weight.shape):
                raise ValueError(f"{name}: block-int8 shape {packed.shape} != the weight's")
            if isinstance(owner, Linear):
                owner.block_int8 = packed
            if name == head:
                self.lm_head_block_int8 = packed

    def rope_table(self, positions: torch.Tensor) -> torch.Tensor:
        """complex64 `(T, hd/2)`: the reference's `freqs_cis` rows, `polar(1, pos * f)` from
        float32 angles."""
        angles = positions.float().unsqueeze(1) * self.rope_freqs.float().unsqueeze(0)
        return torch.polar(torch.ones_like(angles), angles)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs_cis = self.rope_table(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs_cis, kv.k[i], kv.v[i], meta)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype, then upcast: float32 holding bf16-rounded values in bf16."""
        return linear(hidden, self.lm_head_weight, self.lm_head_block_int8).float()
