"""nucleus: a Python inference engine for Llama 3 family models."""

from nucleus.async_llm import AsyncLLM
from nucleus.config import ModelConfig
from nucleus.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
from nucleus.llm import LLM
from nucleus.model import Transformer
from nucleus.outputs import CompletionOutput, RequestOutput
from nucleus.sampling_params import SamplingParams
from nucleus.tokenizer import ChatFormat, Tokenizer

__all__ = [
    "LLM",
    "AsyncLLM",
    "ChatFormat",
    "ChatPrediction",
    "CompletionOutput",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
]
