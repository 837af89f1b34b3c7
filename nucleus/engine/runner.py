"""The model runner: a scheduled batch in, one sampled token per finished chunk out.

The only part of the engine that touches tensors. It lays the scheduled sequences out as one flat
batch (input ids, positions, slot mapping, block tables, context lengths, query starts), runs the
model, computes logits only for the rows that are sampled (and the prompt rows whose logprobs are
asked), and calls the `Sampler`. One host transfer per step brings the results back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from nucleus.attention import AttentionMetadata, KVCache
from nucleus.engine.scheduler import ScheduledBatch
from nucleus.engine.sequence import Sequence
from nucleus.engine.structured import PendingMasks
from nucleus.model import Transformer
from nucleus.sampling import Sampler, SamplingTensors, compute_logprobs

GiB = 1 << 30


@dataclass
class StepResult:
    """Per row of the batch: the sampled token (None where nothing was sampled), its raw logprob
    and top-N alternatives (None unless asked), and an error message for a failed row."""

    token_ids: list[int | None]
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: `cuda.mem_get_info` on CUDA, available RAM elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 * GiB  # unknown platform: a modest guess


def auto_num_blocks(
    model: Transformer,
    *,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_num_seqs: int,
    memory_fraction: float | None = None,
    cpu_cap_bytes: int = 8 * GiB,
) -> int:
    """How many KV blocks to allocate: a fraction of free memory (CUDA: 0.9 of what is free after
    the weights; CPU: 0.3 of available RAM, at most `cpu_cap_bytes`), never more than
    `max_num_seqs` full-length sequences need, and never fewer than one sequence needs."""
    per_block = KVCache.bytes_per_block(model.config, block_size, dtype)
    fraction = memory_fraction or (0.9 if device.type == "cuda" else 0.3)
    budget = int(available_memory_bytes(device) * fraction)
    if device.type != "cuda":
        budget = min(budget, cpu_cap_bytes)
    one_seq = -(-max_model_len // block_size)
    useful = one_seq * max_num_seqs
    num = min(budget // per_block, useful)
    if num < one_seq:
        raise MemoryError(
            f"the KV cache for one sequence of {max_model_len} tokens needs "
            f"{one_seq * per_block / GiB:.2f} GiB; only {budget / GiB:.2f} GiB can be used on "
            f"{device}: lower max_model_len or set num_kv_blocks"
        )
    return num


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        *,
        num_kv_blocks: int,
        block_size: int = 16,
        kv_dtype: torch.dtype | None = None,
        stop_token_ids: frozenset[int] | set[int] = frozenset(),
    ) -> None:
        self.model = model
        self.config = model.config
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.dtype = kv_dtype or weight.dtype
        self.block_size = block_size
        self.kv = KVCache.allocate(self.config, num_kv_blocks, block_size, self.dtype, self.device)
        self.sampler = Sampler()
        self.stop_token_ids = frozenset(stop_token_ids)

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
        self,
        seqs: list[Sequence],
        starts: list[int],
        num_tokens: list[int],
        *,
        exact_attention: bool = False,
    ) -> torch.Tensor:
        """Hidden states `(T, dim)` of tokens `token_ids[start : start + n]` of each sequence, in
        order, their K/V written through each sequence's block table.

        The engine plans attention per kind of row (decodes batched, each prefill chunk alone);
        `exact_attention` pads every row instead and keeps the reference's arithmetic
        (`nucleus.attention.paged_attention`), which `nucleus.Llama` needs for seed-for-seed results.
        """
        ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        for seq, start, n in zip(seqs, starts, num_tokens, strict=True):
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            context_lens.append(start + n)
        meta = AttentionMetadata.build(
            num_tokens,
            context_lens,
            [s.block_table for s in seqs],
            self.block_size,
            self.device,
            planned=not exact_attention,
        )
        return self.model.forward(
            torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
            self.kv,
            meta,
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, masks: PendingMasks | None = None) -> StepResult:
        """Run one step. `masks`: the structured-output masks of the constrained rows among the
        sampled ones (`StructuredOutputs.begin`), awaited only before sampling."""
        dev = self.device
        hidden = self.forward(batch.seqs, batch.starts, batch.num_tokens)
        ends = [start for start in _cumsum(batch.num_tokens)[1:]]
        rows = batch.sample_indices
        result = StepResult([None] * len(batch), [None] * len(batch), [None] * len(batch))
        self._prompt_logprobs(batch, hidden)
        if not rows:
            return result
        seqs = [batch.seqs[i] for i in rows]
        logits = self.model.compute_logits(
            hidden[torch.tensor([ends[i] - 1 for i in rows], device=dev)]
        )
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
            allowed=masks.wait(dev) if masks is not None else None,
        )
        out = self.sampler(logits, st)
        host = [out.token_ids, out.nonfinite]
        if out.logprobs is not None:
            host.append(out.logprobs)
            if out.top_ids is not None:
                host += [out.top_ids, out.top_logprobs]
        host = [t.tolist() for t in host]  # the step's one device-to-host copy (per tensor)
        tokens, nonfinite = host[0], host[1]
        blocked = masks.blocked if masks is not None else ()
        for j, i in enumerate(rows):
            if nonfinite[j]:
                result.errors[i] = "the model's logits for this sequence are not finite (NaN/inf)"
                continue
            if j in blocked:
                result.errors[i] = "the output constraint allows no token here"
                continue
            result.token_ids[i] = tokens[j]
            n_top = st.num_logprobs[j]
            if n_top >= 0:
                entry = {tokens[j]: host[2][j]}
                if n_top > 0:
                    for t, lp in zip(host[3][j][:n_top], host[4][j][:n_top], strict=True):
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


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
