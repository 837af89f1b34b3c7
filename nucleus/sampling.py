"""From logits to tokens: the reference's `sample_top_p`, and the engine's batched `Sampler`.

The `Sampler` works on a whole batch at once (no Python loop per request), in this order:
penalties and logit bias on the logits, the structured-output masks (a bias of -inf on the tokens
a row's constraint does not allow, added to the constrained rows only), temperature, softmax, one
descending sort shared by top-k, min-p and top-p, then a draw by exponential race,
`argmax(probs / q)` with `q ~ Exp(1)`, which is how `torch.multinomial(probs, 1)` draws. Rows
with their own seed draw `q` from their own `torch.Generator`, one `(V,)` draw per generated token
whatever the batch, so a seeded request gives the same tokens alone or in a batch. That per-row
draw is the only loop over rows, and only over rows that carry a generator. Log-probabilities are
always of the raw model distribution (`log_softmax` of the unmodified logits), as the reference
gives.

Top-p on a row without top-k or min-p is exactly the reference's `sample_top_p`: the kept tokens
are those whose higher-ranked mass (exclusive cumulative sum) is `<= p`. With top-k or min-p, those
filters go first (both keep a prefix of the sorted order), the row is renormalised, then top-p.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from nucleus.sampling_params import SamplingParams
from nucleus.transfer import to_device


def sample_top_p(
    probs: torch.Tensor, p: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Meta's `sample_top_p`, step for step (reference-semantics 2.3).

    Args:
        probs: float32 `(B, V)` probabilities (temperature already applied).
        p: the top-p threshold; a token is kept iff the mass ranked above it is `<= p`.
        generator: optional; the reference draws from the default generator.

    Returns:
        `(B, 1)` int64 token ids. Draws one `(B, V)` exponential tensor in sorted order.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    next_token = torch.gather(probs_idx, -1, next_token)
    return next_token


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    # Per-row tensors of the sampled path (None when every row is greedy: argmax needs none).
    temperature: torch.Tensor | None  # (B,) float32; 1.0 on greedy rows
    greedy: torch.Tensor | None  # (B,) bool
    top_p: torch.Tensor | None  # (B,) float32
    top_k: torch.Tensor | None  # (B,) int64; V where off
    min_p: torch.Tensor | None  # (B,) float32
    generators: list[torch.Generator | None]
    greedy_rows: list[bool]
    num_logprobs: list[int]  # per row: N top alternatives wanted, -1 for no logprobs at all
    all_greedy: bool = False
    do_top_p: bool = False
    do_top_k: bool = False
    do_min_p: bool = False
    # Penalties (None when no row has any).
    repetition_penalty: torch.Tensor | None = None  # (B,)
    frequency_penalty: torch.Tensor | None = None  # (B,)
    presence_penalty: torch.Tensor | None = None  # (B,)
    output_counts: torch.Tensor | None = None  # (B, V) float32: times each token was generated
    prompt_mask: torch.Tensor | None = None  # (B, V) bool: token occurs in the prompt
    # Additive biases and bans as (rows, token ids, values); bans are -inf (min_tokens).
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    # Structured outputs: (rows (K,), bias (K, V) float32: 0 where the row's constraint allows the
    # token, -inf where not) for the K constrained rows; None when no row is constrained.
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def max_logprobs(self) -> int:
        return max(self.num_logprobs, default=-1)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        *,
        vocab_size: int,
        device: torch.device | str = "cpu",
        generators: Sequence[torch.Generator | None] | None = None,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        output_ids: Sequence[Sequence[int]] | None = None,
        banned_ids: Sequence[Iterable[int]] | None = None,
        token_counts: tuple[torch.Tensor, torch.Tensor] | None = None,
        allowed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplingTensors:
        """Build the step's tensors from each row's params (once per step).

        `prompt_ids`/`output_ids` are needed only when a row has a penalty, unless `token_counts`
        gives their result, `(output counts (B, V) float32, prompt masks (B, V) bool)`, already on
        the device (`nucleus.engine.penalties`); `banned_ids[i]` are tokens row `i` may not
        produce this step (its stop tokens, while under `min_tokens`); `allowed`: the
        structured-output masks of the constrained rows (`SamplingTensors.allowed`).
        """
        B, V = len(params), vocab_size

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        temps = [p.temperature for p in params]
        greedy = [t == 0 for t in temps]
        top_k = [V if p.top_k <= 0 or p.top_k >= V else p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        sampled = not all(greedy)
        st = cls(
            temperature=tensor(
                [1.0 if g else t for g, t in zip(greedy, temps, strict=True)], torch.float32
            )
            if sampled
            else None,
            greedy=tensor(greedy, torch.bool) if sampled else None,
            top_p=tensor(top_p, torch.float32) if sampled else None,
            top_k=tensor(top_k, torch.int64) if sampled else None,
            min_p=tensor(min_p, torch.float32) if sampled else None,
            generators=list(generators) if generators is not None else [None] * B,
            greedy_rows=greedy,
            num_logprobs=[-1 if p.logprobs is None else p.logprobs for p in params],
            all_greedy=all(greedy),
            do_top_p=any(p < 1.0 for p, g in zip(top_p, greedy, strict=True) if not g),
            do_top_k=any(k < V for k, g in zip(top_k, greedy, strict=True) if not g),
            do_min_p=any(m > 0 for m, g in zip(min_p, greedy, strict=True) if not g),
            allowed=allowed,
        )
        if len(st.generators) != B:
            raise ValueError(f"{len(st.generators)} generators for {B} rows")

        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        do_rep = any(r != 1.0 for r in rep)
        do_freq = any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres)
        if do_rep or do_freq:
            if token_counts is None and (output_ids is None or (do_rep and prompt_ids is None)):
                raise ValueError("penalties need the rows' prompt_ids and output_ids")
            if token_counts is not None:
                st.output_counts, prompt_mask = token_counts
            else:
                st.output_counts = _token_counts(output_ids, V, device)
            if do_rep:
                st.repetition_penalty = tensor(rep, torch.float32)
                if token_counts is None:
                    prompt_mask = _token_counts(prompt_ids, V, device) > 0
                st.prompt_mask = prompt_mask
            if do_freq:
                st.frequency_penalty = tensor(freq, torch.float32)
                st.presence_penalty = tensor(pres, torch.float32)

        entries = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        entries = [e for e in entries if e[1] < V]
        if entries:
            rows, toks, vals = zip(*entries, strict=True)
            st.bias = (
                tensor(list(rows), torch.int64),
                tensor(list(toks), torch.int64),
                tensor(list(vals), torch.float32),
            )
        if banned_ids is not None:
            bans = [(i, t) for i, ids in enumerate(banned_ids) for t in ids if 0 <= t < V]
            if bans:
                rows, toks = zip(*bans, strict=True)
                st.banned = (tensor(list(rows), torch.int64), tensor(list(toks), torch.int64))
        return st


def _token_counts(ids: Sequence[Sequence[int]], V: int, device: torch.device | str) -> torch.Tensor:
    """(B, V) float32 counts of each token id per row, by one scatter-add over padded ids."""
    B = len(ids)
    width = max((len(x) for x in ids), default=0)
    counts = torch.zeros(B, V + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.full((B, width), V, dtype=torch.int64)  # V: a spare column, dropped below
        for i, x in enumerate(ids):
            if x:
                padded[i, : len(x)] = torch.as_tensor(x, dtype=torch.int64)
        padded = to_device(padded, torch.int64, device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :V]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32: raw log-prob of the chosen token
    top_ids: torch.Tensor | None  # (B, N) int64, N = the largest number of logprobs asked
    top_logprobs: torch.Tensor | None  # (B, N) float32
    nonfinite: torch.Tensor  # (B,) bool: the row's logits held NaN or inf


def apply_penalties(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Repetition (vLLM/HF: divide positive logits, multiply negative ones, for every token in the
    prompt or output), then frequency and presence (OpenAI: on output counts), then bias and bans.
    Returns a new tensor when anything applies, else `logits` itself."""
    x = logits
    if st.repetition_penalty is not None:
        seen = st.prompt_mask | (st.output_counts > 0)
        r = st.repetition_penalty[:, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if st.frequency_penalty is not None:
        counts = st.output_counts
        x = x - st.frequency_penalty[:, None] * counts - st.presence_penalty[:, None] * (counts > 0)
    if st.bias is not None or st.banned is not None:
        x = x.clone() if x is logits else x
        if st.bias is not None:
            rows, toks, vals = st.bias
            x.index_put_((rows, toks), vals, accumulate=True)
        if st.banned is not None:
            rows, toks = st.banned
            x[rows, toks] = float("-inf")
    return x


def filter_sorted_probs(sorted_probs: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Top-k, min-p, then top-p on probabilities sorted in descending order; renormalised.

    A row with neither top-k nor min-p sees exactly the reference's top-p computation.
    """
    V = sorted_probs.shape[-1]
    s = sorted_probs
    if st.do_top_k or st.do_min_p:
        drop = torch.zeros_like(s, dtype=torch.bool)
        if st.do_top_k:
            ranks = torch.arange(V, device=s.device)
            drop |= ranks[None, :] >= st.top_k[:, None]
        if st.do_min_p:
            drop |= s < st.min_p[:, None] * s[:, :1]
        s = s.masked_fill(drop, 0.0)
        active = (st.top_k < V) | (st.min_p > 0)
        s = torch.where(active[:, None], s / s.sum(dim=-1, keepdim=True), s)
    if st.do_top_p:
        s = s.masked_fill(s.cumsum(dim=-1) - s > st.top_p[:, None], 0.0)
    return s / s.sum(dim=-1, keepdim=True)


class Sampler:
    """Picks the next token of every row of a `(B, V)` float32 logits tensor."""

    def __call__(self, logits: torch.Tensor, st: SamplingTensors) -> SamplerOutput:
        logits = logits.float()
        # One pass: a NaN or inf anywhere in a row makes its sum NaN or inf.
        nonfinite = ~torch.isfinite(logits.sum(dim=-1))
        x = apply_penalties(logits, st)
        if st.allowed is not None:
            x = x.index_add(0, *st.allowed)  # a new tensor: the raw logits stay for logprobs
        greedy_tokens = x.argmax(dim=-1)
        if st.all_greedy:
            tokens = greedy_tokens
        else:
            probs = torch.softmax(x / st.temperature[:, None], dim=-1)
            tokens = torch.where(st.greedy, greedy_tokens, self._draw(probs, st))
        out = SamplerOutput(tokens, None, None, None, nonfinite)
        if st.max_logprobs >= 0:
            out.logprobs, out.top_ids, out.top_logprobs = compute_logprobs(
                logits, tokens, st.max_logprobs
            )
        return out

    @staticmethod
    def _draw(probs: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        B, V = probs.shape
        unseeded = all(g is None for g in st.generators)
        if unseeded and not (st.do_top_p or st.do_top_k or st.do_min_p):
            # Nothing to filter and no seeded row to reproduce: the same race over the unsorted
            # probabilities draws from the same distribution without sorting (B, V) each step.
            q = torch.empty_like(probs).exponential_()
            return (probs / q).masked_fill(probs == 0, -1.0).argmax(dim=-1)
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
        sorted_probs = filter_sorted_probs(sorted_probs, st)
        q = exponentials(B, V, st.generators, st.greedy_rows, probs.device)
        # p / q as torch.multinomial does; a zero-probability token can never win (q == 0 guard).
        scores = (sorted_probs / q).masked_fill(sorted_probs == 0, -1.0)
        choice = scores.argmax(dim=-1, keepdim=True)
        return sorted_idx.gather(-1, choice).squeeze(-1)


def exponentials(
    B: int,
    V: int,
    generators: Sequence[torch.Generator | None],
    greedy_rows: Sequence[bool] | None,
    device: torch.device | str,
) -> torch.Tensor:
    """`(B, V)` Exp(1) draws: rows with a generator draw `(V,)` from it (a short loop over those
    rows only; greedy ones draw nothing); the other rows draw together from the default
    generator."""
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if not seeded:
        return torch.empty(B, V, device=device).exponential_()
    q = torch.ones(B, V, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        rows = to_device(unseeded, torch.int64, device)
        q.index_copy_(0, rows, torch.empty(len(unseeded), V, device=device).exponential_())
    for i in seeded:
        if not (greedy_rows and greedy_rows[i]):
            q[i].exponential_(generator=generators[i])
    return q


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Raw log-probabilities: of `token_ids` `(N,)` under each row of `logits` `(N, V)`, and the
    `num_top` most likely tokens per row (None when `num_top <= 0`)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None].long()).squeeze(-1)
    if num_top <= 0:
        return chosen, None, None
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen, top_ids, top_logprobs
