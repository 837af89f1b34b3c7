"""The model runner: a scheduled batch in, one sampled token per finished chunk out.

The only part of the engine that touches tensors. When it is built it allocates the KV cache,
chooses the attention backend and the model's kernels (once: `select_backend`,
`Transformer.bind_kernels`) and, on CUDA, captures the decode graphs (`graphs.DecodeStep`). Each
step it lays the scheduled sequences out as one flat batch (input ids, positions, and the
backend's metadata: slot mapping, block tables, context lengths), runs the model, computes logits
only for the rows that are sampled (and the prompt rows whose logprobs are asked), and calls the
`Sampler`. Decode-only steps on a backend that supports graphs go through `DecodeStep`'s static
buffers instead. One host transfer per step brings the results back.
"""

from __future__ import annotations

import torch

from nucleus.attention import KVCache, select_backend
from nucleus.engine import kv_budget
from nucleus.engine.graphs import DecodeStep
from nucleus.engine.scheduler import ScheduledBatch, StepResult
from nucleus.engine.sequence import Sequence
from nucleus.model import Transformer
from nucleus.sampling import Sampler, SamplingTensors, compute_logprobs


def auto_num_blocks(
    model: Transformer,
    *,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_num_seqs: int,
    memory_fraction: float | None = None,
) -> int:
    """How many KV blocks to allocate (`nucleus.engine.kv_budget.num_kv_blocks`): CUDA counts
    what is free after the weights; the CPU counts available RAM, with a cap."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fraction, cap = memory_fraction or kv_budget.CUDA_FRACTION, None
    else:
        free = kv_budget.available_ram_bytes()
        fraction, cap = memory_fraction or kv_budget.CPU_FRACTION, kv_budget.CPU_CAP_BYTES
    return kv_budget.num_kv_blocks(
        bytes_per_block=KVCache.bytes_per_block(model.config, block_size, dtype),
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        free_bytes=free,
        fraction=fraction,
        cap_bytes=cap,
        where=str(device),
    )


class ModelRunner:
    """Runs scheduled batches on one model.

    Args:
        model: the model; its kernels are chosen for its device and dtype here.
        num_kv_blocks, block_size: the KV cache's geometry.
        kv_dtype: the cache's dtype (default: the model's).
        stop_token_ids: the model's stop tokens (banned while a sequence is under `min_tokens`).
        attention_backend: "auto" (the fastest for the device and dtype), or a name from
            `nucleus.attention.BACKENDS`; "reference" pads every row and keeps the reference's
            arithmetic, which `nucleus.Llama` needs for seed-for-seed results.
        max_model_len: the longest context a step may have.
        max_num_seqs: the most sequences in one step (the largest decode graph).
        enforce_eager: never capture or replay CUDA graphs.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        num_kv_blocks: int,
        block_size: int = 16,
        kv_dtype: torch.dtype | None = None,
        stop_token_ids: frozenset[int] | set[int] = frozenset(),
        attention_backend: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enforce_eager: bool = False,
    ) -> None:
        self.model = model
        self.config = model.config
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.dtype = kv_dtype or weight.dtype
        self.block_size = block_size
        max_model_len = max_model_len or num_kv_blocks * block_size
        model.bind_kernels()
        kv = KVCache.allocate(self.config, num_kv_blocks, block_size, self.dtype, self.device)
        self.attention = select_backend(kv, attention_backend, max_context=max_model_len)
        self.sampler = Sampler()
        self.stop_token_ids = frozenset(stop_token_ids)
        self.decode_step = None
        if self.attention.supports_cuda_graphs:
            self.decode_step = DecodeStep(
                model,
                self.attention,
                max_num_seqs=max_num_seqs,
                max_blocks_per_seq=-(-max_model_len // block_size),
                use_graphs=not enforce_eager and self.device.type == "cuda",
            )

    @property
    def kv(self) -> KVCache:
        return self.attention.kv

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.seed is None:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
        return seq.generator

    def _banned(self, seq: Sequence) -> list[int]:
        """Stop tokens a sequence may not produce yet (while under `min_tokens`)."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        return [*(() if p.ignore_eos else self.stop_token_ids), *(p.stop_token_ids or ())]

    @torch.inference_mode()
    def forward(
        self, seqs: list[Sequence], starts: list[int], num_tokens: list[int]
    ) -> torch.Tensor:
        """Hidden states `(T, dim)` of tokens `token_ids[start : start + n]` of each sequence, in
        order, their K/V written through each sequence's block table."""
        ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        for seq, start, n in zip(seqs, starts, num_tokens, strict=True):
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            context_lens.append(start + n)
        meta = self.attention.build_metadata(
            num_tokens, context_lens, [s.block_table for s in seqs]
        )
        return self.model.forward(
            torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
            self.attention,
            meta,
        )

    def _logits(self, batch: ScheduledBatch, rows: list[int]) -> torch.Tensor:
        """Float32 logits `(len(rows), V)` of the last token of each row in `rows` (possibly
        none: a step of prefill chunks that sample nothing still runs the model): from the
        decode step's static buffers (and graphs) when the batch is decodes only, else from an
        eager pass over the flat batch."""
        if self.decode_step is not None and _all_decode(batch):
            seqs = batch.seqs
            return self.decode_step(
                [s.token_ids[start] for s, start in zip(seqs, batch.starts, strict=True)],
                batch.starts,
                [s.block_table for s in seqs],
                self.block_size,
            )
        hidden = self.forward(batch.seqs, batch.starts, batch.num_tokens)
        self._prompt_logprobs(batch, hidden)
        ends = _cumsum(batch.num_tokens)[1:]
        last = torch.tensor([ends[i] - 1 for i in rows], dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[last])

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        dev = self.device
        rows = [i for i, need in enumerate(batch.needs_sample) if need]
        result = StepResult([None] * len(batch), [None] * len(batch), [None] * len(batch))
        logits = self._logits(batch, rows)
        if not rows:
            return result
        seqs = [batch.seqs[i] for i in rows]
        params = [s.params for s in seqs]
        penalties = any(
            p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty for p in params
        )
        st = SamplingTensors.build(
            params,
            vocab_size=logits.shape[-1],
            device=dev,
            generators=[self._generator(s) for s in seqs],
            prompt_ids=[s.prompt_token_ids for s in seqs] if penalties else None,
            output_ids=[s.output_token_ids for s in seqs] if penalties else None,
            banned_ids=[self._banned(s) for s in seqs],
        )
        out = self.sampler(logits, st)
        # The step's one device-to-host copy: tokens and the non-finite flags together, then the
        # logprobs only when asked.
        tokens, nonfinite = torch.stack([out.token_ids, out.nonfinite.long()]).tolist()
        host = []
        if out.logprobs is not None:
            host = [out.logprobs.tolist()]
            if out.top_ids is not None:
                host += [out.top_ids.tolist(), out.top_logprobs.tolist()]
        for j, i in enumerate(rows):
            if nonfinite[j]:
                result.errors[i] = "the model's logits for this sequence are not finite (NaN/inf)"
                continue
            result.token_ids[i] = tokens[j]
            n_top = st.num_logprobs[j]
            if n_top >= 0:
                entry = {tokens[j]: host[0][j]}
                if n_top > 0:
                    for t, lp in zip(host[1][j][:n_top], host[2][j][:n_top], strict=True):
                        entry.setdefault(t, lp)
                result.logprobs[i] = entry
        return result

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Fill `seq.prompt_logprobs` (first entry None) for the prompt positions of this chunk."""
        offset = 0
        for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens, strict=True):
            want = seq.params.prompt_logprobs
            lo, hi = offset, offset + n
            offset = hi
            if want is None or len(seq.prompt_logprobs) >= seq.num_prompt_tokens:
                continue
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)
            # Hidden state at position p predicts token p + 1; record p + 1 not yet recorded.
            first = len(seq.prompt_logprobs) - 1
            last = min(start + n, seq.num_prompt_tokens - 1)
            if last <= first or first < start:
                continue
            h = hidden[lo + first - start : lo + last - start]
            targets = torch.tensor(seq.token_ids[first + 1 : last + 1], device=h.device)
            chosen, top_ids, top_lps = compute_logprobs(self.model.compute_logits(h), targets, want)
            chosen = chosen.tolist()
            top_ids = top_ids.tolist() if top_ids is not None else None
            top_lps = top_lps.tolist() if top_lps is not None else None
            for k, t in enumerate(seq.token_ids[first + 1 : last + 1]):
                entry = {t: chosen[k]}
                if top_ids is not None:
                    for tid, lp in zip(top_ids[k], top_lps[k], strict=True):
                        entry.setdefault(tid, lp)
                seq.prompt_logprobs.append(entry)


def _all_decode(batch: ScheduledBatch) -> bool:
    """Every row computes one token and samples it, and none wants prompt logprobs."""
    return (
        all(n == 1 for n in batch.num_tokens)
        and all(batch.needs_sample)
        and all(s.params.prompt_logprobs is None for s in batch.seqs)
    )


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
