"""A toy tokenizer and tiny random models: the engine's tests need a model, not a language."""

from __future__ import annotations

import torch

from nucleus.config import ModelConfig
from nucleus.model import Transformer

EOS = 1


class ToyTokenizer:
    """One token per character; token 1 stops. Decodes each id to one letter."""

    stop_tokens = frozenset({EOS})

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.special_tokens: dict[str, int] = {}

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        return [2 + (ord(c) % (self.vocab_size - 2)) for c in s]

    def encode_prompt(self, s: str) -> list[int]:
        return self.encode(s, bos=False, eos=False)

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("A") + i % 58) for i in ids)


def tiny_model(
    *, vocab_size: int, dim: int, ffn: int, max_len: int, std: float, seed: int
) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        dim=dim,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        ffn_hidden_dim=ffn,
        max_position_embeddings=max_len,
    )
    model = Transformer(config)
    # The draw `nn.Embedding`'s constructor made when the tests were written (the model's
    # embedding, like Meta's, draws nothing now): the tests keep the weights they were written for.
    torch.empty(vocab_size, dim).normal_()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.eval()
