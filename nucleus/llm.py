"""`nucleus.LLM`: offline batch generation, the API vLLM users know.

    llm = LLM()                                     # the built-in default model
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason

A thin loop over `LLMEngine`: every prompt is added at once, the engine's continuous batching runs
them to completion, and the outputs come back in prompt order.

`LLM(model, tensor_parallel_size=N)` runs the model across N devices (N processes on the CPU):
this process is rank 0 and starts the other ranks' worker processes itself
(`nucleus.distributed.workers`); the engine, the scheduler and the sampler stay here.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nucleus.cpu.model import CpuModel
from nucleus.distributed.group import TensorParallel, cpu_threads_per_rank
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.model import Transformer
from nucleus.outputs import RequestOutput
from nucleus.sampling_params import SamplingParams
from nucleus.tools import Tool, ToolRequest, encode_tool_chat

PromptType = str | list[int] | dict[str, Any]
# Builds rank `tp.rank`'s shard of the model on `tp.device` (`nucleus.distributed.workers`).
ModelBuilder = Callable[[TensorParallel], Transformer]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or CUDA when available, else the CPU (as `nucleus.generation.default_device`,
    without importing the reference API and the engine's runner with it)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA (fp16 without bf16), float32 on the CPU.

    On the CPU float32 is the fastest correct choice where the processor lacks native bf16
    arithmetic (AVX512-BF16/AMX): bf16 weights are then widened on every use, which costs more
    than the bandwidth it saves (measured in `docs/benchmarks.md`).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or 'auto'"
        ) from None


def _load_shard(
    model: str | Path | None, tokenizer: str | Path | None, dtype: torch.dtype, tp: TensorParallel
) -> Transformer:
    """A worker's shard of the model that an `LLM` was given (its own arguments)."""
    from nucleus.loaders import load_model_files

    files = load_model_files(model, tokenizer_path=tokenizer)
    return files.build_model(device=tp.device, dtype=dtype, tp=tp)


def is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[str | list[int]]:
    """One prompt or a list of them; each a string, a list of token ids, or a vLLM-style dict
    (`{"prompt": str}` or `{"prompt_token_ids": list[int]}`)."""

    def one(p: object) -> str | list[int]:
        if isinstance(p, str):
            return p
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                ids = list(p["prompt_token_ids"])
                if not is_token_ids(ids):
                    raise TypeError("prompt_token_ids must be a list of ints")
                return ids
            if isinstance(p.get("prompt"), str):
                return p["prompt"]
            raise TypeError("a prompt dict needs 'prompt' (str) or 'prompt_token_ids' (list[int])")
        if isinstance(p, (list, tuple)) and is_token_ids(list(p)):
            return list(p)
        raise TypeError(f"a prompt is a str, a list of token ids or a dict, got {type(p).__name__}")

    if isinstance(prompts, (str, dict)):
        return [one(prompts)]
    if isinstance(prompts, (list, tuple)):
        if prompts and is_token_ids(list(prompts)):
            return [list(prompts)]  # a single prompt of token ids
        return [one(p) for p in prompts]
    raise TypeError("prompts must be a str, a list of token ids, or a list of prompts")


def expand_params(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts: give one, or one each")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError("sampling_params must be SamplingParams")
    return params


class LLM:
    """Offline generation over the paged-KV engine.

    Args:
        model: a `.gguf` file, a Meta checkpoint directory, a Hugging Face directory, or None for
            the built-in default model (SmolLM2-135M-Instruct).
        device: "cpu", "cuda", ... (default: CUDA when available).
        dtype: "float32" for exactness, "bfloat16", "float16", or None/"auto" (bf16 on CUDA,
            float32 on the CPU: the fastest correct choice there, see `resolve_dtype`).
        tokenizer: a tokenizer file overriding the model's own.
        seed: seeds the default generator that unseeded sampled requests draw from.
        num_threads: CPU threads for torch (default: torch's own choice; with tensor parallelism on
            the CPU, the cores shared out between the ranks).
        tensor_parallel_size: devices (ranks) the model is split across: with N > 1, rank r runs
            on `cuda:r` (or every rank on the CPU, over gloo), in a worker process this `LLM`
            starts (rank 0 runs here); `shutdown()` (or the end of the program) ends them.
            Programs that use it need an `if __name__ == "__main__":` guard (the workers are
            started with `spawn`, which imports the main module).
        exact: on the CPU, a GGUF model runs through the C forward pass over its own blocks with
            8-bit activations, as llama.cpp computes it (`nucleus.cpu`; docs/cpu.md states its
            error); `exact=True` runs the torch model on the dequantized weights in float32
            instead (slower). Other devices, dtypes, formats and tensor parallelism always take
            the torch model.
        **engine_options: `EngineConfig` fields: `block_size`, `num_kv_blocks`, `max_num_seqs`,
            `max_num_batched_tokens`, `context_cost_tokens` (docs/scheduling.md),
            `max_model_len`, `enable_prefix_caching`, `kv_dtype`, `memory_fraction`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: str | Path | None = None,
        seed: int | None = None,
        num_threads: int | None = None,
        tensor_parallel_size: int = 1,
        exact: bool = False,
        **engine_options: Any,
    ) -> None:
        from nucleus.loaders import load_model_files

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        config = self._engine_config(engine_options, tensor_parallel_size, num_threads, seed)
        files = load_model_files(model, tokenizer_path=tokenizer)
        self.model_name = files.name
        self.chat_format = files.chat
        self.tokenizer = files.tokenizer
        cpu_path = files.gguf is not None and self.device.type == "cpu" and not exact
        if cpu_path and self.dtype == torch.float32 and tensor_parallel_size == 1:
            self._ids = itertools.count()
            self.model = files.build_cpu_model(num_threads=num_threads)
            self.engine = LLMEngine(self.model, self.tokenizer, config)
            return

        def build(tp: TensorParallel) -> Transformer:
            nonlocal files
            shard = files.build_model(device=tp.device, dtype=self.dtype, tp=tp)
            files = None  # the checkpoint's memory goes to the KV cache
            return shard

        worker_build = functools.partial(_load_shard, model, tokenizer, self.dtype)
        self._start(build, worker_build, tensor_parallel_size, config)

    @classmethod
    def from_builder(
        cls,
        build: ModelBuilder,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        tensor_parallel_size: int = 1,
        chat_format: Any = None,
        name: str = "model",
        **engine_options: Any,
    ) -> LLM:
        """An `LLM` over the model that `build(tp)` makes for each rank `tp` (its shard, on
        `tp.device`); with `tensor_parallel_size > 1`, `build` goes to the worker processes, so
        it must be picklable (a module-level function or a `functools.partial` of one).
        Benchmarks use it for random weights made on each device."""
        self = cls.__new__(cls)
        self.device = resolve_device(device)
        self.tokenizer, self.chat_format, self.model_name = tokenizer, chat_format, name
        config = self._engine_config(engine_options, tensor_parallel_size, None, None)
        self._start(build, build, tensor_parallel_size, config)
        self.dtype = self.model.tok_embeddings.weight.dtype
        return self

    def _engine_config(
        self,
        options: dict[str, Any],
        tensor_parallel_size: int,
        num_threads: int | None,
        seed: int | None,
    ) -> EngineConfig:
        unknown = set(options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown LLM options: {sorted(unknown)}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size!r}")
        if isinstance(options.get("kv_dtype"), str):
            options["kv_dtype"] = resolve_dtype(options["kv_dtype"], torch.device("cpu"))
        if num_threads is None and tensor_parallel_size > 1 and self.device.type == "cpu":
            num_threads = cpu_threads_per_rank(tensor_parallel_size)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if seed is not None:
            torch.manual_seed(seed)
        return EngineConfig(**options)

    def _start(
        self,
        build: ModelBuilder,
        worker_build: ModelBuilder,
        tensor_parallel_size: int,
        config: EngineConfig,
    ) -> None:
        """Build rank 0's model here (the whole model with one rank) and the engine over it;
        with more ranks, start the workers first (they load while this process does)."""
        self._ids = itertools.count()
        if tensor_parallel_size == 1:
            self.model = build(TensorParallel(device=self.device))
            self.engine = LLMEngine(self.model, self.tokenizer, config)
            return
        from nucleus.distributed.workers import WorkerGroup

        workers = WorkerGroup.start(worker_build, tensor_parallel_size, self.device)
        try:
            self.model = build(workers.tp)
            workers.connect()
            self.engine = LLMEngine(self.model, self.tokenizer, config, workers=workers)
        except BaseException:
            workers.close()
            raise

    @classmethod
    def from_engine(cls, engine: LLMEngine, chat_format: Any = None, name: str = "model") -> LLM:
        """Wrap an engine built elsewhere (tests, custom models)."""
        self = cls.__new__(cls)
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self.chat_format, self.model_name = chat_format, name
        if isinstance(engine.model, CpuModel):
            self.device, self.dtype = torch.device("cpu"), torch.float32
        else:
            weight = engine.model.tok_embeddings.weight
            self.device, self.dtype = weight.device, weight.dtype
        self._ids = itertools.count()
        return self

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def shutdown(self) -> None:
        """End the worker processes of a tensor-parallel model; the `LLM` cannot generate after."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; one `RequestOutput` per prompt, in prompt order.

        `prompts`: a string, a list of token ids, a vLLM-style dict, or a list of those.
        `sampling_params`: one for all, or one per prompt (default `SamplingParams()`).
        A prompt the engine refuses (too long, ids out of range) raises before anything runs.
        """
        items = normalize_prompts(prompts)
        params = expand_params(sampling_params, len(items))
        return self._run(items, params, use_tqdm=use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
    ) -> list[RequestOutput]:
        """Chat completions: one conversation (a list of `{"role", "content"}` dicts) or a list of
        conversations, formatted with the model's chat format and ended with the assistant
        header.

        `tools`, `tool_choice` and `parallel_tool_calls` are OpenAI's (`nucleus.tools`); with
        tools, each output's `tool_calls` holds the calls found in its text (None when it is
        plain content). Messages may hold OpenAI's `tool_calls` and `role: "tool"` results.
        """
        if self.chat_format is None:
            raise ValueError("this model has no chat format")
        if not isinstance(messages, (list, tuple)):
            raise TypeError("messages must be a conversation or a list of conversations")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        request = ToolRequest.build(tools, tool_choice, parallel_tool_calls)
        shown = request.prompt_tools if request else None
        items = [self.encode_chat(list(c), tools=shown) for c in conversations]
        params = expand_params(sampling_params, len(items))
        if request is not None:
            params = [request.sampling_params(p, self.chat_format) for p in params]
        outputs = self._run(items, params, use_tqdm=use_tqdm)
        if request is not None:
            for out in outputs:
                for c in out.outputs:
                    c.tool_calls = request.parse(c.text)
        return outputs

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: Sequence[Tool] | None = None
    ) -> list[int]:
        return encode_tool_chat(self.chat_format, messages, tools)

    def _run(
        self, items: list[str | list[int]], params: list[SamplingParams], *, use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = [f"llm-{next(self._ids)}" for _ in items]
        added = []
        try:
            for rid, prompt, p in zip(ids, items, params, strict=True):
                engine.add_request(rid, prompt, p, stream=False)
                added.append(rid)
        except Exception:
            for rid in added:  # all or nothing: leave the engine as it was
                engine.abort(rid)
            while engine.has_unfinished():
                engine.step()
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        final: dict[str, RequestOutput] = {}
        try:
            wanted = set(ids)
            while len(final) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            while engine.has_unfinished():
                engine.step()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[rid] for rid in ids]
