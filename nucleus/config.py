"""One `ModelConfig` for every checkpoint format: Meta `params.json`, Hugging Face `config.json`, GGUF."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A model configuration that nucleus cannot run, with the field that is wrong."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling (`apply_scaling` in llama-models, `rope_type="llama3"` in HF)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def apply(self, freqs: Any, where: Callable[[Any, Any, Any], Any]) -> Any:
        """The scaled per-pair frequencies of `freqs` (a torch or numpy array; `where` is its
        library's `where`), in the arithmetic of llama-models' `apply_scaling`."""
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        interpolated = (1 - smooth) * freqs / self.factor + smooth * freqs
        scaled = where(wavelen > low_freq_wavelen, freqs / self.factor, interpolated)
        return where(wavelen < high_freq_wavelen, freqs, scaled)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-architecture model.

    Weights always use Meta's names and Meta's interleaved RoPE row order (see `nucleus.model`).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    head_dim: int = 0  # 0 means dim // n_heads
    max_position_embeddings: int | None = None  # None: no limit known from the checkpoint

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"model config: dim ({self.dim}) is not divisible by n_heads ({self.n_heads})"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def ffn_hidden_from_multiplier(
        dim: int, multiple_of: int, ffn_dim_multiplier: float | None
    ) -> int:
        """The SwiGLU width exactly as Meta's `FeedForward.__init__` derives it."""
        hidden = int(2 * (4 * dim) / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        return multiple_of * math.ceil(hidden / multiple_of)

    @classmethod
    def from_meta_params(cls, params: dict[str, Any]) -> ModelConfig:
        """From a Meta `params.json` (Llama 3; 3.1+ adds `use_scaled_rope`).

        Unknown keys (vision, quantization, LoRA arguments) are ignored, as in llama-models.
        """
        try:
            dim = int(params["dim"])
            n_heads = int(params["n_heads"])
            ffn = cls.ffn_hidden_from_multiplier(
                dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
            )
            return cls(
                dim=dim,
                n_layers=int(params["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads),
                vocab_size=int(params["vocab_size"]),
                ffn_hidden_dim=ffn,
                norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 500000.0)),
                rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
            )
        except KeyError as e:
            raise ConfigError(f"params.json: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"params.json: malformed value ({e})") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` of a `LlamaForCausalLM`."""
        try:
            dim = int(config["hidden_size"])
            n_heads = int(config["num_attention_heads"])
            scaling = None
            rope = config.get("rope_scaling") or config.get("rope_parameters")
            if rope:
                kind = rope.get("rope_type", rope.get("type"))
                if kind == "llama3":
                    scaling = RopeScaling(
                        factor=float(rope["factor"]),
                        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                        original_max_position_embeddings=int(
                            rope.get("original_max_position_embeddings", 8192)
                        ),
                    )
                elif kind not in (None, "default"):
                    raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported")
            theta = config.get("rope_theta")
            if theta is None and rope:
                theta = rope.get("rope_theta")
            return cls(
                dim=dim,
                n_layers=int(config["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                vocab_size=int(config["vocab_size"]),
                ffn_hidden_dim=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta if theta is not None else 10000.0),
                rope_scaling=scaling,
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                head_dim=int(config.get("head_dim") or 0),
                max_position_embeddings=config.get("max_position_embeddings"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json: malformed value ({e})") from None
