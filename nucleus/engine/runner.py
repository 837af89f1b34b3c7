"""The model runner: a scheduled batch in, one sampled token per finished chunk out.

The only part of the engine that touches tensors. When it is built it allocates the KV cache,
chooses the attention backend and the model's kernels (once: `select_backend`,
`Transformer.bind_kernels`) and, on CUDA, captures the decode graphs (`graphs.DecodeStep`). Each
step it plans the model's work (`ModelStep`: the scheduled sequences as one flat batch, and the
rows that get logits: those sampled, and the prompt rows whose logprobs are asked), runs it (the
model over the flat batch with the backend's metadata: slot mapping, block tables, context
lengths; or, for decode-only steps on a backend that supports graphs, `DecodeStep`'s static
buffers), and calls the `Sampler`. One host transfer per step brings the results back.

Under tensor parallelism the runner of the engine's process drives the group: it sends each
`ModelStep` to the workers (`nucleus.distributed.workers`), whose own runners run it in lockstep,
each on its shard of the model and its KV heads; sampling happens here only (a step launched
ahead gets the tokens it reads on the device by a broadcast from this rank).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nucleus.attention import KVCache, select_backend
from nucleus.engine import kv_budget
from nucleus.engine.graphs import DecodeStep
from nucleus.engine.penalties import PenaltyCounts, has_penalties
from nucleus.engine.scheduler import ScheduledBatch, StepResult
from nucleus.engine.sequence import Sequence
from nucleus.engine.structured import PendingMasks
from nucleus.model import Transformer
from nucleus.sampling import Sampler, SamplingTensors, compute_logprobs
from nucleus.transfer import to_device, to_host

if TYPE_CHECKING:
    from nucleus.distributed.workers import WorkerGroup


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
    workers: WorkerGroup | None = None  # the wait is on every rank of a tensor-parallel group

    def result(self) -> StepResult:
        n = self.batch_size
        result = StepResult([None] * n, [None] * n, [None] * n)
        if not self.rows:
            return result
        if self.event is not None:
            with self.workers.lockstep() if self.workers else contextlib.nullcontext():
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


@dataclass
class ModelStep:
    """A step's work for the model, the same on every rank of a tensor-parallel group (plain
    lists: the engine's process sends it to the workers). Row `i` computes `num_tokens[i]` tokens
    (`token_ids`, flat) from position `starts[i]` through `block_tables[i]`; the hidden states of
    flat rows `logit_rows` get logits. `decode`: one token per row, every row sampled, run on
    `DecodeStep`'s buffers (and graphs); with `source_rows`, row `i`'s token is entry
    `source_rows[i]` of the `num_source` tokens the step before sampled, read on the device."""

    token_ids: list[int]
    starts: list[int]
    num_tokens: list[int]
    block_tables: list[list[int]]
    logit_rows: list[int]
    decode: bool = False
    source_rows: list[int] | None = None
    num_source: int = 0


@dataclass
class _PromptRows:
    """Prompt positions `first + 1 .. last` of `seq` get logprobs from the hidden states of its
    positions `first .. last - 1`, which are flat rows `row ..` of the step."""

    seq: Sequence
    first: int
    last: int
    row: int


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
    what is free after the weights; the CPU counts available RAM, with a cap, shared by the ranks
    of a tensor-parallel group. Every rank of a group holds as many blocks, of its KV heads."""
    world = model.tp.world_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fraction, cap = memory_fraction or kv_budget.CUDA_FRACTION, None
    else:
        free = kv_budget.available_ram_bytes() // world
        fraction = memory_fraction or kv_budget.CPU_FRACTION
        cap = kv_budget.CPU_CAP_BYTES // world
    return kv_budget.num_kv_blocks(
        bytes_per_block=KVCache.bytes_per_block(model.config, block_size, dtype, world),
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
        workers: the other ranks of the model's tensor-parallel group (this runner drives them:
            they build their runners with the same arguments and run every step with it).
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
        workers: WorkerGroup | None = None,
    ) -> None:
        self.workers = workers
        self.model = model
        self.config = model.config
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.dtype = kv_dtype or weight.dtype
        self.block_size = block_size
        self.sampler = Sampler()
        self.penalties: PenaltyCounts | None = None
        self.stop_token_ids = frozenset(stop_token_ids)
        max_model_len = max_model_len or num_kv_blocks * block_size
        if workers is not None:  # their runners allocate and capture in lockstep with this one
            workers.before_leave.append(self.close)
            workers.start_runners(
                num_kv_blocks=num_kv_blocks,
                block_size=block_size,
                kv_dtype=kv_dtype,
                attention_backend=attention_backend,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                enforce_eager=enforce_eager,
            )
        with workers.lockstep() if workers else contextlib.nullcontext():
            model.bind_kernels()
            kv = KVCache.allocate(
                self.config, num_kv_blocks, block_size, self.dtype, self.device, model.tp.world_size
            )
            self.attention = select_backend(kv, attention_backend, max_context=max_model_len)
            self.decode_step = None
            if self.attention.supports_cuda_graphs:
                self.decode_step = DecodeStep(
                    model,
                    self.attention,
                    max_num_seqs=max_num_seqs,
                    max_blocks_per_seq=-(-max_model_len // block_size),
                    use_graphs=not enforce_eager and self.device.type == "cuda",
                )
            if self.attention.supports_cuda_graphs and self.device.type == "cuda":
                # a serving engine's backend; `Llama.generate`'s runner per call skips this
                self._warm_up(max_num_seqs, max_model_len)

    @torch.inference_mode()
    def _warm_up(self, max_num_seqs: int, max_model_len: int) -> None:
        """Run each shape of eager step once, so that its Triton kernels compile now and not
        under the first requests (a compile takes about half a second). Triton compiles a kernel
        per value of its compile-time arguments and per integer argument that is 1, divides by
        16, or neither: so a one-token step; prefill chunks whose block tables are 1, 2 and 16
        blocks wide; token counts that do and do not divide by 16; and a prefill beside every
        number of decode rows the backend compiles separately. Every position maps to block 0,
        which no sequence holds yet."""
        bs = self.block_size
        steps = [([1], [1]), ([15, 1], [0, 1])]  # (tokens per row, start of each row)
        for width in (1, 2, 16):  # a prefill of up to 16 tokens ending its table's last block
            n = min(16, width * bs)
            if n > 1 and width * bs <= max_model_len:
                steps.append(([n], [width * bs - n]))
        steps += [
            ([16] + [1] * b, [0] + [1] * b)
            for b in self.attention.eager_decode_batches(max_num_seqs)
        ]
        for num_tokens, starts in steps:
            tables = [[0] * -(-(s + n) // bs) for s, n in zip(starts, num_tokens, strict=True)]
            self._forward([0] * sum(num_tokens), starts, num_tokens, tables)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
        index = to_device(penalized, torch.long, self.device)
        full_counts = counts.new_zeros(len(seqs), vocab).index_copy_(0, index, counts)
        full_masks = masks.new_zeros(len(seqs), vocab).index_copy_(0, index, masks)
        return rows, full_counts, full_masks, index

    def close(self) -> None:
        """Free the decode graphs (before a tensor-parallel group is left); the runner can still
        run steps after, eagerly."""
        if self.decode_step is not None:
            self.decode_step.close()

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
        ids = _flat_ids(seqs, starts, num_tokens)
        return self._forward(ids, starts, num_tokens, [s.block_table for s in seqs])

    def _forward(
        self,
        token_ids: list[int],
        starts: list[int],
        num_tokens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        positions = [p for start, n in zip(starts, num_tokens, strict=True)
                     for p in range(start, start + n)]  # fmt: skip
        context_lens = [start + n for start, n in zip(starts, num_tokens, strict=True)]
        meta = self.attention.build_metadata(num_tokens, context_lens, block_tables)
        return self.model.forward(
            to_device(token_ids, torch.long, self.device),
            to_device(positions, torch.long, self.device),
            self.attention,
            meta,
        )

    def plan(
        self, batch: ScheduledBatch, rows: list[int], after: StepHandle | None = None
    ) -> tuple[ModelStep, list[_PromptRows]]:
        """The model's work for a batch whose rows `rows` are sampled: a decode step on the
        static buffers when the batch is decodes only (and the backend has them), else a flat
        batch whose logit rows are the prompt rows that want logprobs, then each sampled row's
        last token. With `after` (a decode step launched just before), each row's input token is
        the one `after` sampled for its sequence, read on the device (its host copy may not have
        arrived)."""
        seqs, tables = batch.seqs, [s.block_table for s in batch.seqs]
        if self.decode_step is not None and _all_decode(batch):
            step = ModelStep([], batch.starts, batch.num_tokens, tables, rows, decode=True)
            if after is None:
                step.token_ids = [s.token_ids[p] for s, p in zip(seqs, batch.starts, strict=True)]
            else:
                row_of = {seq.seq_id: j for j, seq in enumerate(after.sampled_seqs)}
                step.source_rows = [row_of[s.seq_id] for s in seqs]
                step.num_source = len(after.sampled_seqs)
            return step, []
        if after is not None:
            raise ValueError("only decode steps on static buffers take tokens from the device")
        ids = _flat_ids(seqs, batch.starts, batch.num_tokens)
        offsets = _cumsum(batch.num_tokens)
        prompt = self._prompt_rows(batch, offsets)
        logit_rows = [r for p in prompt for r in range(p.row, p.row + p.last - p.first)]
        logit_rows += [offsets[i + 1] - 1 for i in rows]
        return ModelStep(ids, batch.starts, batch.num_tokens, tables, logit_rows), prompt

    @torch.inference_mode()
    def run(self, step: ModelStep, sampled: torch.Tensor | None = None) -> torch.Tensor | None:
        """Float32 logits `(len(step.logit_rows), V)` of a step (None when no row wants them:
        a step of prefill chunks that sample nothing still runs the model). `sampled`: the
        tokens the step before sampled, on this device, for a step that reads its tokens there
        (on the engine's rank; the other ranks of a group receive them from it)."""
        if not step.decode:
            hidden = self._forward(step.token_ids, step.starts, step.num_tokens, step.block_tables)
            if not step.logit_rows:
                return None
            rows = to_device(step.logit_rows, torch.long, self.device)
            return self.model.compute_logits(hidden[rows])
        if step.source_rows is None:
            return self.decode_step(
                step.starts, step.block_tables, self.block_size, token_ids=step.token_ids
            )
        if sampled is None:
            sampled = torch.empty(step.num_source, dtype=torch.long, device=self.device)
        sampled = self.model.tp.broadcast(sampled)
        return self.decode_step(
            step.starts,
            step.block_tables,
            self.block_size,
            token_source=(sampled, step.source_rows),
        )

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
        whose sampled tokens feed this one (see `plan`). `masks`: the structured-output masks of
        the constrained rows among the sampled ones (`StructuredOutputs.begin`), awaited only once
        the logits are queued. Under tensor parallelism every rank runs the model's part; a
        failure on any rank ends the group."""
        rows = batch.sample_indices
        step, prompt = self.plan(batch, rows, after)
        if self.workers is not None:
            self.workers.send(step)
        with self.workers.lockstep() if self.workers else contextlib.nullcontext():
            logits = self.run(step, after.tokens if after is not None else None)
            n_prompt = len(step.logit_rows) - len(rows)
            if prompt:
                self._record_prompt_logprobs(prompt, logits[:n_prompt])
            if not rows:
                return StepHandle(len(batch), [], [], [])
            return self._sample(batch, rows, logits[n_prompt:], after, masks)

    def _sample(
        self,
        batch: ScheduledBatch,
        rows: list[int],
        logits: torch.Tensor,
        after: StepHandle | None,
        masks: PendingMasks | None,
    ) -> StepHandle:
        """Sample the `rows` of the batch from their `logits`, queue the copy to the host."""
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
        host = [to_host(t) for t in device]
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        blocked = masks.blocked if masks is not None else set()
        return StepHandle(
            len(batch), rows, seqs, st.num_logprobs, out.token_ids, host, event, blocked,
            self.workers,
        )  # fmt: skip

    def execute(self, batch: ScheduledBatch, masks: PendingMasks | None = None) -> StepResult:
        """Run one step and wait for its results."""
        return self.launch(batch, masks=masks).result()

    def _prompt_rows(self, batch: ScheduledBatch, offsets: list[int]) -> list[_PromptRows]:
        """The prompt positions of this step whose logprobs are asked and not yet recorded."""
        out = []
        rows = zip(batch.seqs, batch.starts, batch.num_tokens, offsets[:-1], strict=True)
        for seq, start, n, lo in rows:
            if seq.params.prompt_logprobs is None:
                continue
            if len(seq.prompt_logprobs) >= seq.num_prompt_tokens:
                continue
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # the first prompt token has no prediction
            # Hidden state at position p predicts token p + 1; record p + 1 not yet recorded.
            first = len(seq.prompt_logprobs) - 1
            last = min(start + n, seq.num_prompt_tokens - 1)
            if last <= first or first < start:
                continue
            out.append(_PromptRows(seq, first, last, lo + first - start))
        return out

    def _record_prompt_logprobs(self, prompt: list[_PromptRows], logits: torch.Tensor) -> None:
        """Append to each `seq.prompt_logprobs` the entries of its rows' logits."""
        offset = 0
        for p in prompt:
            seq, n = p.seq, p.last - p.first
            targets = torch.tensor(seq.token_ids[p.first + 1 : p.last + 1], device=logits.device)
            want = seq.params.prompt_logprobs
            chosen, top_ids, top_lps = compute_logprobs(logits[offset : offset + n], targets, want)
            offset += n
            chosen = chosen.tolist()
            top_ids = top_ids.tolist() if top_ids is not None else None
            top_lps = top_lps.tolist() if top_lps is not None else None
            for k, t in enumerate(seq.token_ids[p.first + 1 : p.last + 1]):
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


def _flat_ids(seqs: list[Sequence], starts: list[int], num_tokens: list[int]) -> list[int]:
    """Tokens `token_ids[start : start + n]` of each sequence, one after another."""
    ids: list[int] = []
    for seq, start, n in zip(seqs, starts, num_tokens, strict=True):
        ids.extend(seq.token_ids[start : start + n])
    return ids


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out
