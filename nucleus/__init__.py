"""nucleus: a Python inference engine for Llama 3 family models.

The public names are imported on first use (PEP 562), so `import nucleus` costs nothing and a
command imports only what it runs: `nucleus generate` on the CPU never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "nucleus.llm",
    "AsyncLLM": "nucleus.async_llm",
    "ChatFormat": "nucleus.tokenizer",
    "ChatPrediction": "nucleus.generation",
    "CompletionOutput": "nucleus.outputs",
    "CompletionPrediction": "nucleus.generation",
    "Dialog": "nucleus.generation",
    "Llama": "nucleus.generation",
    "Message": "nucleus.generation",
    "ModelConfig": "nucleus.config",
    "RequestOutput": "nucleus.outputs",
    "SamplingParams": "nucleus.sampling_params",
    "Tokenizer": "nucleus.tokenizer",
    "Transformer": "nucleus.model",
}

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

if TYPE_CHECKING:
    from nucleus.async_llm import AsyncLLM
    from nucleus.config import ModelConfig
    from nucleus.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
    from nucleus.llm import LLM
    from nucleus.model import Transformer
    from nucleus.outputs import CompletionOutput, RequestOutput
    from nucleus.sampling_params import SamplingParams
    from nucleus.tokenizer import ChatFormat, Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nucleus' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
