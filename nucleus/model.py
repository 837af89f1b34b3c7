"""The Llama transformer: RMSNorm, RoPE (with Llama 3.1 scaling), GQA attention, SwiGLU.

One model for every path. It follows Meta's `llama/model.py` in names and in the order and
rounding of its floating-point operations; what differs is the batch (a flat run of tokens with
their positions, attending through a paged KV cache) and three seams chosen once per model
(`bind_kernels`), never tested on the hot path:
- the elementwise ops (`nucleus.ops`: torch, the CPU's C kernels, or Triton on CUDA);
- each `Linear`'s weight form (`nucleus.linear`), with Q/K/V and the SwiGLU gate/up projections
  fused into one matrix each when the weights are loaded;
- attention, through the backend the caller passes with its metadata (`nucleus.attention`).

Under tensor parallelism (`nucleus.distributed`) the same model runs on every rank with its shard
of the weights: the linears and the embedding are the sharded layers, which hold this rank's heads
and rows and call the group's collectives; everything else reads as on one device.

A block computes `h = x + attention(norm(x))`, `out = h + feed_forward(norm(h))`; each residual
add is done by the next norm (`add_rms_norm`), which rounds the sum to the model dtype as `x + h`
does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nucleus.attention.base import AttentionBackend
from nucleus.config import ModelConfig, RopeScaling
from nucleus.distributed.group import TensorParallel
from nucleus.distributed.layers import (
    ColumnParallelLinear,
    Heads,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_shardable,
    local_units,
)
from nucleus.ops import ModelOps, TorchOps, select_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops: ModelOps = TorchOps()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(x), x)`; with `residual`: `residual += x` first, `(norm(residual), residual)`."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps), residual


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies in float32; `scaling` is Llama 3.1's `apply_scaling`."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return freqs if scaling is None else scaling.apply(freqs, torch.where)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TensorParallel):
        super().__init__()
        self.layer_id = layer_id
        # This rank's heads (all of them on one device).
        self.n_heads = local_units(config.n_heads, tp.world_size)
        self.n_kv_heads = local_units(config.n_kv_heads, tp.world_size)
        self.head_dim = hd = config.head_dim
        q, kv = Heads(config.n_heads, hd), Heads(config.n_kv_heads, hd)
        self.wqkv = ColumnParallelLinear(config.dim, {"wq": q, "wk": kv, "wv": kv}, tp)
        self.wo = RowParallelLinear(q, config.dim, tp)
        self.ops: ModelOps = TorchOps()

    def forward(
        self, x: torch.Tensor, rope: Any, attn: AttentionBackend, meta: Any
    ) -> torch.Tensor:
        tokens, hd = x.shape[0], self.head_dim
        qkv = self.wqkv(x)
        # Q and K heads sit side by side in each row: one rotation covers both.
        qk_width = (self.n_heads + self.n_kv_heads) * hd
        qk = self.ops.rotary(qkv[:, :qk_width].view(tokens, -1, hd), rope)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = qkv[:, qk_width:].view(tokens, self.n_kv_heads, hd)
        out = attn(self.layer_id, q, k, v, meta)
        return self.wo(out.reshape(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, tp: TensorParallel):
        super().__init__()
        self.w13 = ColumnParallelLinear(dim, {"w1": hidden_dim, "w3": hidden_dim}, tp)  # gate, up
        self.w2 = RowParallelLinear(hidden_dim, dim, tp)
        self.ops: ModelOps = TorchOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.silu_mul(self.w13(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TensorParallel):
        super().__init__()
        self.attention = Attention(config, layer_id, tp)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim, tp)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Any,
        attn: AttentionBackend,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` is the previous block's output still to be added to `residual` (None before the
        first block, where `x` is the embedding). Returns this block's output and the residual."""
        h, residual = self.attention_norm(x, residual)
        h, residual = self.ffn_norm(self.attention(h, rope, attn, meta), residual)
        return self.feed_forward(h), residual


class Transformer(nn.Module):
    """`forward(tokens (T,), positions (T,), attn, meta) -> hidden (T, dim)`; then
    `compute_logits`. `attn` is the attention backend (it holds the KV cache) and `meta` its
    metadata for this step. `tp`: this rank's place in a tensor-parallel group (default: one
    device, the whole model)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        self.tp = tp = tp or TensorParallel()
        check_shardable(config, tp.world_size)
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.dim, tp)
        self.layers = nn.ModuleList(TransformerBlock(config, i, tp) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = ColumnParallelLinear(config.dim, config.vocab_size, tp, gather=True)
        self.tie_weights()
        self.register_buffer(
            "rope_freqs",
            rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling),
            persistent=False,
        )
        self.ops: ModelOps = TorchOps()
        self.kernels_bound = False

    def tie_weights(self) -> None:
        """With tied embeddings, the output head is the embedding matrix itself (one Parameter)."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def bind_kernels(self, *, ops: ModelOps | None = None) -> None:
        """Choose the ops for this model's device and dtype (`nucleus.ops.select_ops`, or `ops`)
        and give them to every module. Called once the weights are placed (each `Linear`'s form
        is chosen then too: `nucleus.loaders.build_transformer`); later calls without arguments
        keep the choice."""
        if self.kernels_bound and ops is None:
            return
        weight = self.tok_embeddings.weight
        ops = ops or select_ops(weight.device, weight.dtype, self.max_positions)
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        self.kernels_bound = True

    def checkpoint_name(self, module_name: str) -> str:
        """Where a module's weight lives in a checkpoint: the output head of a model with tied
        embeddings is the embedding matrix."""
        if module_name == "output" and self.config.tie_embeddings:
            return "tok_embeddings"
        return module_name

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings or 131072

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        x, residual = self.tok_embeddings(tokens), None
        rope = self.ops.rope(self.rope_freqs, positions)
        for layer in self.layers:
            x, residual = layer(x, residual, rope, attn, meta)
        return self.norm(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype (every rank's vocabulary slice gathered), then upcast:
        float32 holding bf16-rounded values in bf16."""
        return self.output(hidden).float()
