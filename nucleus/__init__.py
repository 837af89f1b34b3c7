"""nucleus: a Python inference engine for Llama 3 family models."""

from nucleus.config import ModelConfig
from nucleus.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
from nucleus.model import Transformer
from nucleus.tokenizer import ChatFormat, Tokenizer

__all__ = [
    "ChatFormat",
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
]
