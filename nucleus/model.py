"""The Llama transformer: RMSNorm, RoPE (with Llama 3.1 scaling), GQA attention, SwiGLU.

One model for every path. It follows Meta's `llama/model.py` in names, weight layout and the
order of its floating-point operations; what differs is the batch: a flat run of tokens with their
positions, attending through a paged KV cache (`nucleus.attention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nucleus.attention import AttentionMetadata, KVCache, paged_attention, write_kv
from nucleus.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs `(x[2i], x[2i+1])` of `x (T, heads, hd)` in float32 (Meta's layout)."""
    xf = x.float().unflatten(-1, (-1, 2))
    even, odd = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = apply_rotary(self.wq(x).view(tokens, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(tokens, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(tokens, self.n_kv_heads, self.head_dim)
        write_kv(cache_k, cache_v, k, v, meta.slot_mapping)
        out = paged_attention(q, cache_k, cache_v, meta)
        return self.wo(out.reshape(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, cache_k, cache_v, meta) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache_k, cache_v, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """`forward(tokens (T,), positions (T,), kv, meta) -> hidden (T, dim)`; then `compute_logits`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = (
            None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        )
        self.register_buffer(
            "rope_freqs",
            rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
            persistent=False,
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 angles `pos * f`, as the reference's precomputed `freqs_cis` rows.
        angles = positions.float().unsqueeze(1) * self.rope_freqs.float().unsqueeze(0)
        return torch.cos(angles), torch.sin(angles)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_tables(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, kv.k[i], kv.v[i], meta)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype, then upcast: float32 holding bf16-rounded values in bf16."""
        return F.linear(hidden, self.lm_head_weight).float()
