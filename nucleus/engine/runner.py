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

import os
from dataclasses import dataclass, field

import torch

from nucleus.attention import KVCache, select_backend
from nucleus.engine.graphs import DecodeStep
from nucleus.engine.penalties import PenaltyCounts, has_penalties
from nucleus.engine.scheduler import ScheduledBatch
from nucleus.engine.sequence import Sequence
from nucleus.engine.structured import PendingMasks
from nucleus.model import Transformer
from nucleus.sampling import Sampler, SamplingTensors, compute_logprobs

GiB = 1 << 30


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`, queued without waiting (into pinned memory from a GPU)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass
class StepResult:
    """Per row of the batch: the sampled token (None where nothing was sampled), its raw logprob
    and top-N alternatives (None unless asked), and an error message for a failed row."""

    token_ids: list[int | None]
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


@dataclass
class StepHandle:
    """A launched step: its results are on their way to the host (`result()` waits for them).

    `tokens` are the sampled tokens on the device, one per sampling row, in the order of
    `sampled_seqs`: the next decode step may read them there before they reach the host.
    """

    batch_size: int
    rows: list[int]  # the batch rows that sample
    sampled_seqs: list[Sequence]
    num_logprobs: list[int]  # per sampling row: N top alternatives wanted, -1 for none
    tokens: torch.Tensor | None = None
    host: list[torch.Tensor] = field(default_factory=list)
    event: torch.cuda.Event | None = None
    blocked: set[int] = field(default_factory=set)  # sampling rows whose constraint allows nothing

    def result(self) -> StepResult:
        n = self.batch_size
        result = StepResult([None] * n, [None] * n, [None] * n)
        if not self.rows:
            return result
        if self.event is not None:
            self.event.synchronize()
        tokens, nonfinite = self.host[0].tolist()
        lps = [t.tolist() for t in self.host[1:]]
        for j, i in enumerate(self.rows):
            if nonfinite[j]:
                result.errors[i] = "the model's logits for this sequence are not finite (NaN/inf)"
                continue
            if j in self.blocked:
                result.errors[i] = "the output constraint allows no token here"
                continue
            result.token_ids[i] = tokens[j]
            n_top = self.num_logprobs[j]
            if n_top >= 0:
                entry = {tokens[j]: lps[0][j]}
                if n_top > 0:
                    for t, lp in zip(lps[1][j][:n_top], lps[2][j][:n_top], strict=True):
                        entry.setdefault(t, lp)
                result.logprobs[i] = entry
        return result


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
        self.penalties: PenaltyCounts | None = None
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

    def _penalty_counts(self, seqs: list[Sequence], penalized: list[int], vocab: int):
        """`(rows, output counts (B, V), prompt masks (B, V), batch index of the rows)` for the
        sampling rows, zeros where a row has no penalty (`nucleus.engine.penalties`)."""
        if self.penalties is None:
            self.penalties = PenaltyCounts(vocab, self.device)
        rows, counts, masks = self.penalties.gather([seqs[j] for j in penalized])
        if len(penalized) == len(seqs):
            return rows, counts, masks, None
        index = torch.tensor(penalized, dtype=torch.long).to(self.device, non_blocking=True)
        full_counts = counts.new_zeros(len(seqs), vocab).index_copy_(0, index, counts)
        full_masks = masks.new_zeros(len(seqs), vocab).index_copy_(0, index, masks)
        return rows, full_counts, full_masks, index

    def release(self, seq: Sequence) -> None:
        """A sequence ended: drop what the runner kept for it (its penalty counts)."""
        if self.penalties is not None:
            self.penalties.release(seq)

    def _banned(self, seq: Sequence, pending: int = 0) -> list[int]:
        """Stop tokens a sequence may not produce yet (while under `min_tokens`); `pending`:
        its tokens sampled but not yet on the host."""
        p = seq.params
        if seq.num_output_tokens + pending >= p.min_tokens:
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

    def _logits(
        self, batch: ScheduledBatch, rows: list[int], after: StepHandle | None
    ) -> torch.Tensor:
        """Float32 logits `(len(rows), V)` of the last token of each row in `rows` (possibly
        none: a step of prefill chunks that sample nothing still runs the model): from the
        decode step's static buffers (and graphs) when the batch is decodes only, else from an
        eager pass over the flat batch. With `after`, each row's input token is the one `after`
        sampled for its sequence, read on the device (its host copy may not have arrived)."""
        if self.decode_step is not None and _all_decode(batch):
            seqs = batch.seqs
            tables = [s.block_table for s in seqs]
            if after is None:
                ids = [s.token_ids[start] for s, start in zip(seqs, batch.starts, strict=True)]
                return self.decode_step(batch.starts, tables, self.block_size, token_ids=ids)
            row_of = {seq.seq_id: j for j, seq in enumerate(after.sampled_seqs)}
            return self.decode_step(
                batch.starts,
                tables,
                self.block_size,
                token_source=(after.tokens, [row_of[s.seq_id] for s in seqs]),
            )
        if after is not None:
            raise ValueError("only decode steps on static buffers take tokens from the device")
        hidden = self.forward(batch.seqs, batch.starts, batch.num_tokens)
        self._prompt_logprobs(batch, hidden)
        ends = _cumsum(batch.num_tokens)[1:]
        last = torch.tensor([ends[i] - 1 for i in rows], dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[last])

    @property
    def can_feed_tokens_on_device(self) -> bool:
        """Whether `launch(..., after=...)` works: decode steps run on static buffers."""
        return self.decode_step is not None

    @torch.inference_mode()
    def launch(
        self,
        batch: ScheduledBatch,
        after: StepHandle | None = None,
        masks: PendingMasks | None = None,
    ) -> StepHandle:
        """Queue the step on the device and the copy of its results to the host, without waiting
        for either: `StepHandle.result()` waits. `after`: a decode step launched just before,
        whose sampled tokens feed this one (see `_logits`). `masks`: the structured-output masks
        of the constrained rows among the sampled ones (`StructuredOutputs.begin`), awaited only
        once the logits are queued."""
        rows = batch.sample_indices
        logits = self._logits(batch, rows, after)
        if not rows:
            return StepHandle(len(batch), [], [], [])
        seqs = [batch.seqs[i] for i in rows]
        params = [s.params for s in seqs]
        penalized = [j for j, p in enumerate(params) if has_penalties(p)]
        counts = self._penalty_counts(seqs, penalized, logits.shape[-1]) if penalized else None
        pending = 1 if after is not None else 0  # a step ahead: one token not yet on the host
        st = SamplingTensors.build(
            params,
            vocab_size=logits.shape[-1],
            device=self.device,
            generators=[self._generator(s) for s in seqs],
            banned_ids=[self._banned(s, pending) for s in seqs],
            token_counts=counts[1:3] if counts else None,
            allowed=masks.wait(self.device) if masks is not None else None,
        )
        out = self.sampler(logits, st)
        if counts is not None:  # the new tokens join their sequences' counts, on the device
            picked = out.token_ids if len(penalized) == len(seqs) else out.token_ids[counts[3]]
            self.penalties.add(counts[0], picked)
        # The step's one device-to-host copy: tokens and the non-finite flags together, then the
        # logprobs only when asked; queued now, waited for in `result()`.
        device = [torch.stack([out.token_ids, out.nonfinite.long()])]
        if out.logprobs is not None:
            device.append(out.logprobs)
            if out.top_ids is not None:
                device += [out.top_ids, out.top_logprobs]
        host = [_to_host(t) for t in device]
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        blocked = masks.blocked if masks is not None else set()
        return StepHandle(
            len(batch), rows, seqs, st.num_logprobs, out.token_ids, host, event, blocked
        )

    def execute(self, batch: ScheduledBatch, masks: PendingMasks | None = None) -> StepResult:
        """Run one step and wait for its results."""
        return self.launch(batch, masks=masks).result()

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
    """Every row computes one token and samples it, and no row still owes prompt logprobs (a
    one-token prompt's first step)."""
    return (
        all(n == 1 for n in batch.num_tokens)
        and all(batch.needs_sample)
        and all(s.params.prompt_logprobs is None or s.prompt_logprobs for s in batch.seqs)
    )


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
