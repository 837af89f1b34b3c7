"""The engine loop: requests in, cumulative `RequestOutput`s out, one scheduler step at a time.

`LLMEngine` owns the scheduler (policy), the block manager (bookkeeping), the model runner
(tensors) and one incremental detokenizer per sequence. The offline `LLM` and the async face are
thin loops over `add_request` / `step` / `abort`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nucleus.config import ModelConfig
from nucleus.cpu.model import CpuModel
from nucleus.engine.block_manager import BlockManager
from nucleus.engine.detokenizer import IncrementalDetokenizer
from nucleus.engine.scheduler import ScheduledBatch, Scheduler
from nucleus.engine.sequence import Sequence, SequenceStatus
from nucleus.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nucleus.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from nucleus.distributed.workers import WorkerGroup
    from nucleus.engine.runner import StepHandle
    from nucleus.engine.structured import StructuredOutputs
    from nucleus.model import Transformer

# torch, the model runner and structured outputs are imported when a torch model or a constrained
# request needs them: a `CpuModel`'s greedy requests run without torch (`nucleus.cpu.runner`).

# Defaults per device type (docs/scheduling.md says how they were chosen): a GPU step costs about
# the same from 1 to a few hundred rows (the weights are read once either way), so it takes many
# sequences and large prefill chunks; a CPU step costs in proportion to its tokens, and a budget of
# 128 keeps one under about 0.2 s with the default model, so no running stream waits long for its
# next token whatever else arrives.
DEVICE_DEFAULTS = {
    "cuda": {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "admit_max_wait": 32},
    "cpu": {"max_num_seqs": 64, "max_num_batched_tokens": 128, "admit_max_wait": 0},
}


def context_cost_tokens(config: ModelConfig) -> int:
    """The context length at which a token's attention takes as many FLOPs as its matrix products
    (about 3,000 for SmolLM2-135M, 27,000 for Llama-3-8B): how the scheduler prices long prompts.

    Per layer and token: the projections and the SwiGLU take 2 x (their weights) FLOPs; attending
    over one position takes 4 x n_heads x head_dim (scores and the weighted sum)."""
    c = config
    q_width, kv_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    weights = c.dim * (2 * q_width + 2 * kv_width) + 3 * c.dim * c.ffn_hidden_dim
    return max(1, round(2 * weights / (4 * q_width)))


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int | None:
    """The most characters a text prompt can have and still fit the context (one token stands
    for at most `tokenizer.max_token_chars` characters; BOS aside, a longer text needs
    `max_model_len` tokens or more). None when the tokenizer does not say."""
    per_token = getattr(tokenizer, "max_token_chars", None)
    return None if per_token is None else (max_model_len - 1) * per_token


def check_prompt_text(text: str, limit: int | None, max_model_len: int) -> None:
    """Raises ValueError for a text over `limit` characters (`max_prompt_chars`), untokenized."""
    if limit is not None and len(text) > limit:
        raise ValueError(
            f"the prompt has {len(text)} characters: more than {max_model_len} tokens, "
            f"the context (no text over {limit} characters can fit)"
        )


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from free memory
    max_num_seqs: int | None = None  # None: DEVICE_DEFAULTS for the model's device
    max_num_batched_tokens: int | None = None  # None: likewise
    # A prompt token attending over c positions costs 1 + c / context_cost_tokens of the step's
    # budget. None: from the model's shapes (`context_cost_tokens`); 0: attention is free.
    context_cost_tokens: int | None = None
    # Admission in groups of max_num_seqs // 8 (or after admit_max_wait steps held back) while
    # sequences decode: None: DEVICE_DEFAULTS (CUDA 32 steps; CPU 0: admit whenever there is room).
    admit_max_wait: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    kv_dtype: torch.dtype | None = None  # None: the model's dtype
    memory_fraction: float | None = None
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    attention_backend: str = "auto"  # or one of nucleus.attention.BACKENDS
    # Launch the next decode step before the host has this one's tokens (CUDA graphs only).
    async_scheduling: bool = True
    # A streamed request is reported at its first token, then at most every `stream_interval`
    # steps, and when it ends: with many streams, fewer and larger chunks cost the host (and a
    # server's event loop) less per token (docs/scheduling.md).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise ValueError(f"stream_interval must be an int >= 1, got {self.stream_interval!r}")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    texts: list[str]
    metrics: RequestMetrics
    # Streamed requests report every step; the others (`LLM`) only their final output, and
    # without stop strings their text is decoded once, when each sequence ends.
    stream: bool = True
    reported_finished: bool = False
    pending: bool = field(default=False)  # has news not yet returned by step()
    reports: int = 0  # outputs returned by step() so far
    unreported_steps: int = 0  # steps with news since the last report

    @property
    def text_per_token(self) -> bool:
        return self.stream or bool(self.params.stop_strings)


class LLMEngine:
    """`workers`: the other ranks of the model's tensor-parallel group, driven by the runner."""

    def __init__(
        self,
        model: Transformer | CpuModel,
        tokenizer: Any,
        config: EngineConfig | None = None,
        *,
        workers: WorkerGroup | None = None,
    ):
        config = config or EngineConfig()
        device_type = (
            "cpu" if isinstance(model, CpuModel) else model.tok_embeddings.weight.device.type
        )
        defaults = DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])
        self.config = config = replace(
            config,
            max_num_seqs=config.max_num_seqs or defaults["max_num_seqs"],
            max_num_batched_tokens=config.max_num_batched_tokens
            or defaults["max_num_batched_tokens"],
            admit_max_wait=defaults["admit_max_wait"]
            if config.admit_max_wait is None
            else config.admit_max_wait,
        )
        self.model = model
        self.tokenizer = tokenizer
        mc = model.config
        limit = mc.max_position_embeddings or config.max_model_len or 8192
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.stop_token_ids = frozenset(getattr(tokenizer, "stop_tokens", ()) or ())
        if isinstance(model, CpuModel):
            num_blocks, self.runner = self._cpu_runner(model)
        else:
            num_blocks, self.runner = self._torch_runner(model, workers)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        cost = config.context_cost_tokens
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
            max_model_len=self.max_model_len,
            stop_token_ids=self.stop_token_ids,
            admit_group=config.max_num_seqs // 8 if config.admit_max_wait else 1,
            admit_max_wait=config.admit_max_wait,
            context_cost_tokens=context_cost_tokens(mc) if cost is None else (cost or None),
        )
        self._special_ids = (
            frozenset((getattr(tokenizer, "special_tokens", None) or {}).values())
            | self.stop_token_ids
        )
        self._structured: StructuredOutputs | None = None  # made by the first constrained request
        self.requests: dict[str, _Request] = {}
        self._ahead: tuple[ScheduledBatch, StepHandle] | None = None  # launched, not processed
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    def _torch_runner(self, model: Transformer, workers: WorkerGroup | None) -> tuple[int, Any]:
        from nucleus.engine.runner import ModelRunner, auto_num_blocks

        config = self.config
        device = model.tok_embeddings.weight.device
        kv_dtype = config.kv_dtype or model.tok_embeddings.weight.dtype
        num_blocks = config.num_kv_blocks or auto_num_blocks(
            model,
            block_size=config.block_size,
            dtype=kv_dtype,
            device=device,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            memory_fraction=config.memory_fraction,
        )
        runner = ModelRunner(
            model,
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            kv_dtype=kv_dtype,
            stop_token_ids=self.stop_token_ids,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            attention_backend=config.attention_backend,
            workers=workers,
        )
        return num_blocks, runner

    def _cpu_runner(self, model: CpuModel) -> tuple[int, Any]:
        """The C model's runner (a float16 cache, the C attention: no other choice applies)."""
        from nucleus.cpu.runner import CpuRunner, auto_num_blocks

        config = self.config
        if config.kv_dtype is not None and str(config.kv_dtype).removeprefix("torch.") != "float16":
            raise ValueError(f"the CPU GGUF path keeps a float16 KV cache, not {config.kv_dtype}")
        num_blocks = config.num_kv_blocks or auto_num_blocks(
            model,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            memory_fraction=config.memory_fraction,
        )
        runner = CpuRunner(
            model,
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            stop_token_ids=self.stop_token_ids,
        )
        return num_blocks, runner

    @property
    def structured(self) -> StructuredOutputs:
        """Structured outputs' state (llguidance and torch are imported with it)."""
        if self._structured is None:
            from nucleus.engine.structured import StructuredOutputs

            self._structured = StructuredOutputs(self.tokenizer, self.model.config.vocab_size)
        return self._structured

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        stream: bool = True,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. `prompt`: text (tokenized here, unless its `prompt_token_ids` are
        given) or token ids. `stream=False`: `step` reports it once, when it has finished."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text: str | None = prompt
            if prompt_token_ids is None:
                self.check_prompt_text(prompt)
                ids = self.tokenizer.encode_prompt(prompt)
            else:
                ids = list(prompt_token_ids)
        else:
            text, ids = None, list(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens "
                "and one is needed for the output"
            )
        grammars = [None] * params.n
        if params.structured_outputs is not None:
            grammars = self.structured.matchers(params.structured_outputs, params.n)
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            Sequence(request_id, ids, params, index=i, arrival_time=now) for i in range(params.n)
        ]
        for seq, grammar in zip(seqs, grammars, strict=True):
            seq.grammar = grammar
        skip = self._special_ids if params.skip_special_tokens else self.stop_token_ids
        detoks = [
            IncrementalDetokenizer(self.tokenizer, stop=params.stop_strings, skip_token_ids=skip)
            for _ in seqs
        ]
        self.requests[request_id] = _Request(
            request_id,
            text,
            ids,
            params,
            seqs,
            detoks,
            [""] * len(seqs),
            RequestMetrics(now),
            stream=stream,
        )
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(ids)

    @functools.cached_property
    def max_prompt_chars(self) -> int | None:
        return max_prompt_chars(self.tokenizer, self.max_model_len)

    def check_prompt_text(self, text: str) -> None:
        """Raises ValueError for a text too long to fit the context, without tokenizing it."""
        check_prompt_text(text, self.max_prompt_chars, self.max_model_len)

    def abort(self, request_id: str) -> None:
        """End a request; the next `step` reports it with finish_reason "abort"."""
        req = self.requests.get(request_id)
        if req is None:
            return
        unfinished = [s for s in req.seqs if not s.is_finished]
        self.scheduler.abort(unfinished)
        for seq in unfinished:
            self._end_text(req, seq)
        req.pending = True

    def fail_unfinished(self, message: str, *, waiting_too: bool = False) -> list[RequestOutput]:
        """After a step raised: end the requests with a running sequence (all unfinished ones with
        `waiting_too`, or when none was running) with finish_reason "error" and `message`; their
        blocks go back. Returns their final outputs. Waiting requests otherwise stay queued."""
        self._ahead = None  # a step launched ahead holds only running sequences: ended below
        running = {s.request_id for s in self.scheduler.running}
        if waiting_too or not running:
            running |= {s.request_id for s in self.scheduler.waiting}
            running |= {rid for rid, r in self.requests.items() if not r.reported_finished}
        outputs = []
        for rid in running:
            req = self.requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.error = message
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
                    with contextlib.suppress(Exception):  # else the text so far stands
                        self._end_text(req, seq)
            req.pending = False
            out = self._output(req)
            req.reported_finished = True
            self._forget(req)
            outputs.append(out)
        return outputs

    def has_unfinished(self) -> bool:
        return any(not r.reported_finished for r in self.requests.values())

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of the requests that changed.

        With `async_scheduling`, while a decode step runs on the device the next one is already
        scheduled and launched (`Scheduler.schedule_ahead`), its input tokens read on the device:
        the device never waits for the host's bookkeeping. The next call processes it.
        """
        if self._ahead is not None:
            batch, handle = self._ahead
            self._ahead = None
        else:
            batch = self.scheduler.schedule()
            handle = None if batch.is_empty else self._launch(batch)
        if handle is not None and self.config.async_scheduling:
            self._launch_ahead(batch, handle)
        if handle is not None:
            now = time.monotonic()
            result = handle.result()
            for i, seq in enumerate(batch.seqs):
                if seq.is_finished:
                    continue  # ended after this step was launched ahead: its row is void
                req = self.requests[seq.request_id]
                if req.metrics.first_scheduled_time is None:
                    req.metrics.first_scheduled_time = now
                if result.errors[i] is not None:
                    seq.error = result.errors[i]
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
                    self._end_text(req, seq)
                    req.pending = True
            row_of = {seq.seq_id: i for i, seq in enumerate(batch.seqs)}
            for seq in self.scheduler.postprocess(batch, result.token_ids):
                self._on_token(seq, result.logprobs[row_of[seq.seq_id]])
        outputs = []
        for req in list(self.requests.values()):
            if not req.pending:
                continue
            finished = all(s.is_finished for s in req.seqs)
            if not (req.stream or finished):
                continue
            req.unreported_steps += 1
            if not finished and req.reports and req.unreported_steps < self.config.stream_interval:
                continue
            req.pending = False
            req.reports += 1
            req.unreported_steps = 0
            outputs.append(self._output(req))
            if finished:
                req.reported_finished = True
                self._forget(req)
        return outputs

    def _launch(self, batch: ScheduledBatch) -> StepHandle:
        """Launch a step, its constrained rows' masks computed meanwhile in the worker thread."""
        grammars = [batch.seqs[i].grammar for i in batch.sample_indices]
        masks = None
        if any(g is not None for g in grammars):
            masks = self.structured.begin(grammars, self.runner.device)
        try:
            return self.runner.launch(batch, masks=masks)
        finally:
            if masks is not None:
                masks.finish()  # the matchers are the engine's again

    def _launch_ahead(self, batch: ScheduledBatch, handle: StepHandle) -> None:
        if not self.runner.can_feed_tokens_on_device or not handle.rows:
            return
        if len(handle.rows) != len(batch) or any(n != 1 for n in batch.num_tokens):
            return  # not a decode step
        if any(seq.grammar is not None for seq in batch.seqs):
            return  # a constrained row's next mask needs the token this step samples
        ahead = self.scheduler.schedule_ahead(batch)
        if ahead is not None:
            self._ahead = (ahead, self.runner.launch(ahead, after=handle))

    def _on_token(self, seq: Sequence, logprobs: dict[int, float] | None) -> None:
        req = self.requests[seq.request_id]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        self.num_generated_tokens += 1
        if seq.params.logprobs is not None and logprobs is not None:
            seq.output_logprobs.append(logprobs)
        i, token = seq.index, seq.last_token_id
        detok = req.detoks[i]
        ended_by_token = seq.status is SequenceStatus.FINISHED_STOPPED
        grammar_complete = False
        if seq.grammar is not None and not seq.is_finished:
            error = self.structured.accept(seq.grammar, token)
            if error is not None:
                seq.error = error
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
            grammar_complete = seq.grammar.is_stopped()  # nothing may follow this token
        failed = seq.status is SequenceStatus.FINISHED_ERROR
        if not ended_by_token and not failed and req.text_per_token:
            check = seq.num_output_tokens >= seq.params.min_tokens
            req.texts[i] += detok.add([token], check_stop=check)
            if detok.stopped and not seq.is_finished:
                seq.stop_reason = detok.stop_reason
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if grammar_complete and not seq.is_finished:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if seq.is_finished:
            self._end_text(req, seq)
        req.pending = True

    def _forget(self, req: _Request) -> None:
        """A request reported finished: nothing of it stays in the engine or the runner."""
        del self.requests[req.request_id]
        for seq in req.seqs:
            self.runner.release(seq)

    def _end_text(self, req: _Request, seq: Sequence) -> None:
        """A sequence ended: its text gets what its detokenizer holds back, and, where the text
        was not built token by token, all its output tokens first (but a stop token)."""
        i, detok = seq.index, req.detoks[seq.index]
        if not req.text_per_token:
            ids = seq.output_token_ids
            if seq.status is SequenceStatus.FINISHED_STOPPED and isinstance(seq.stop_reason, int):
                ids = ids[:-1]
            req.texts[i] += detok.add(ids)
        req.texts[i] += detok.flush()

    def _output(self, req: _Request) -> RequestOutput:
        completions = []
        for seq, text in zip(req.seqs, req.texts, strict=True):
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=seq.output_token_ids,  # a new list (a slice)
                    logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                    finish_reason=seq.status.finish_reason,
                    stop_reason=seq.stop_reason,
                    error=seq.error,
                )
            )
        finished = all(s.is_finished for s in req.seqs)
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.monotonic()
        first = req.seqs[0]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=list(first.prompt_logprobs)
            if req.params.prompt_logprobs is not None
            else None,
            metrics=req.metrics,
            num_cached_tokens=first.num_cached_tokens,
        )

    def shutdown(self) -> None:
        """End the worker processes of a tensor-parallel model (nothing to do otherwise)."""
        if self.runner.workers is not None:
            self.runner.workers.close()

    # ---- convenience ------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        ids = [f"gen-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, p, stream=False)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.block_manager.num_queried_blocks,
            "prefix_cache_hits": self.block_manager.num_hit_blocks,
            "generation_tokens": self.num_generated_tokens,
            "prompt_tokens": self.num_prompt_tokens,
        }
