"""Sampling: the reference's top-p exactly; empirical distributions against a direct computation;
seeded rows independent of their batch; raw logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from nucleus.sampling import Sampler, SamplingTensors, sample_top_p
from nucleus.sampling_params import SamplingParams

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])
N = 40_000


def reference_sample_top_p(probs, p):  # Meta's llama/generation.py, literally
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    next_token = torch.gather(probs_idx, -1, next_token)
    return next_token


def build(params, **kw) -> SamplingTensors:
    return SamplingTensors.build(params, vocab_size=kw.pop("vocab_size", V), **kw)


def empirical(params: SamplingParams, logits=LOGITS, **kw) -> list[float]:
    torch.manual_seed(0)
    st = build([params] * N, **{k: [v] * N for k, v in kw.items()})
    tokens = Sampler()(logits.expand(N, -1).clone(), st).token_ids
    return (torch.bincount(tokens, minlength=len(logits)).double() / N).tolist()


def direct(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The distribution written out: softmax, keep top-k and min-p, renormalise, keep top-p."""
    z = [x / temperature for x in logits]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    p = [x / sum(w) for x in w]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    keep = {i for i in keep if p[i] >= min_p * p[order[0]]}
    total = sum(p[i] for i in keep)
    q = [p[i] / total if i in keep else 0.0 for i in range(len(p))]
    kept, mass = [], 0.0
    for i in order:
        if i in keep and mass <= top_p:
            kept.append(i)
            mass += q[i]
    total = sum(q[i] for i in kept)
    return [q[i] / total if i in kept else 0.0 for i in range(len(p))]


def tv(a, b) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b, strict=True))


def test_sample_top_p_is_the_reference_algorithm():
    probs = torch.softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)), -1)
    for p in (0.0, 0.3, 0.9, 1.0):
        torch.manual_seed(5)
        ours = [sample_top_p(probs.clone(), p) for _ in range(5)]
        torch.manual_seed(5)
        theirs = [reference_sample_top_p(probs.clone(), p) for _ in range(5)]
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_sampler_top_p_row_draws_exactly_as_the_reference_with_the_same_generator():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=0.6, top_p=0.9, seed=1234)
    g_ours, g_ref = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    sampler = Sampler()
    for _ in range(20):
        st = build([params], vocab_size=1000, generators=[g_ours])
        ours = sampler(logits, st).token_ids
        ref = sample_top_p(torch.softmax(logits / 0.6, dim=-1), 0.9, generator=g_ref)
        assert ours.tolist() == ref.view(-1).tolist()


def test_a_seeded_row_without_filters_still_draws_as_the_reference():
    """Unseeded rows with nothing to filter skip the sort (the same distribution: the cases
    without top-k/top-p/min-p below); a seeded row keeps the reference's draw seed for seed."""
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.8, seed=99)
    g_ours, g_ref = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    for _ in range(20):
        ours = Sampler()(logits, build([params], vocab_size=1000, generators=[g_ours])).token_ids
        ref = sample_top_p(torch.softmax(logits / 0.8, dim=-1), 1.0, generator=g_ref)
        assert ours.tolist() == ref.view(-1).tolist()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.5},
        {"top_k": 3},
        {"top_p": 0.7},
        {"min_p": 0.2},
        {"top_k": 5, "top_p": 0.8, "min_p": 0.05, "temperature": 1.3},
    ],
)
def test_filters_match_a_direct_computation(kw):
    got = empirical(SamplingParams(**kw))
    want = direct(LOGITS.tolist(), **kw)
    assert all(g == 0 for g, w in zip(got, want, strict=True) if w == 0), (got, want)
    assert tv(got, want) < 0.015, (got, want)


def test_penalties_match_a_direct_computation():
    prompt, output = [0, 3], [1, 1, 2]
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3)
    got = empirical(params, prompt_ids=prompt, output_ids=output)
    x = LOGITS.tolist()
    for t in set(prompt + output):  # repetition: prompt and output tokens
        x[t] = x[t] / 1.5 if x[t] > 0 else x[t] * 1.5
    for t in set(output):  # frequency and presence: output tokens
        x[t] -= 0.4 * output.count(t) + 0.3
    assert tv(got, direct(x)) < 0.015


def test_logit_bias_and_banned_tokens():
    got = empirical(SamplingParams(logit_bias={7: 5.0}), banned_ids=[0, 1])
    x = LOGITS.tolist()
    x[7] += 5.0
    x[0] = x[1] = -math.inf
    assert got[0] == got[1] == 0 and tv(got, direct(x)) < 0.015


def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    st = build(
        [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=2.0)],
        prompt_ids=[[], []],
        output_ids=[[], [0]],
    )
    out = Sampler()(LOGITS.expand(2, -1).clone(), st)
    assert out.token_ids.tolist() == [0, 1]


def test_a_seeded_row_gives_the_same_tokens_alone_or_in_a_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, seed=99),
        SamplingParams(temperature=1.2, min_p=0.1),
        SamplingParams(temperature=0.5, top_p=0.5),
    ]

    def run(batch: bool) -> list[int]:
        torch.manual_seed(123 if batch else 456)  # the default generator must not matter
        mine = torch.Generator().manual_seed(7)
        tokens = []
        for _ in range(10):
            if batch:
                params = [others[0], others[1], seeded, *others[2:]]
                gens = [None, None, mine, torch.Generator().manual_seed(99), None, None]
                st = build(params, vocab_size=500, generators=gens)
                tokens.append(Sampler()(logits, st).token_ids[2].item())
            else:
                st = build([seeded], vocab_size=500, generators=[mine])
                tokens.append(Sampler()(logits[2:3], st).token_ids[0].item())
        return tokens

    assert run(batch=False) == run(batch=True)


def test_logprobs_are_of_the_raw_distribution():
    logits = LOGITS.expand(2, -1).clone()
    params = [SamplingParams(temperature=0.5, top_k=2, logprobs=3), SamplingParams(temperature=0)]
    out = Sampler()(logits, build(params))
    raw = torch.log_softmax(LOGITS, -1)
    assert torch.allclose(out.logprobs, raw[out.token_ids])
    assert out.top_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert torch.allclose(out.top_logprobs[0], raw[:3])


def test_a_nan_row_is_flagged_and_leaves_the_others_alone():
    logits = LOGITS.expand(3, -1).clone()
    logits[1, 4] = float("nan")
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0)]
    out = Sampler()(logits, build(params))
    assert out.nonfinite.tolist() == [False, True, False]
    assert out.token_ids[[0, 2]].tolist() == [0, 0]
