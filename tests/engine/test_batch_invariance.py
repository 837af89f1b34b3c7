"""Greedy outputs of a request are the same alone or among 64 others of mixed lengths, with
prefix caching on or off, and with preemption forced by a tiny KV pool (float32, CPU)."""

from __future__ import annotations

import random

import pytest
from toy import ToyTokenizer, tiny_model

from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.llm import LLM
from nucleus.model import Transformer
from nucleus.sampling_params import SamplingParams

V = 512


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(vocab_size=V, dim=64, ffn=128, max_len=256, std=0.2, seed=1)


rng = random.Random(0)
SHARED = [rng.randrange(2, V) for _ in range(24)]  # a common prefix for some prompts
OTHERS = [
    (SHARED[: rng.randint(0, 24)] if i % 3 == 0 else [])
    + [rng.randrange(2, V) for _ in range(rng.randint(1, 90))]
    for i in range(64)
]
TARGET = [*SHARED, 7, 8, 9, 10, 11]
OTHER_PARAMS = [
    SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in OTHERS
]
TARGET_PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def llm(model, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 400)
    kw.setdefault("block_size", 8)
    kw.setdefault("max_num_seqs", 65)
    return LLM.from_engine(LLMEngine(model, ToyTokenizer(V), EngineConfig(**kw)))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 37},  # chunked prefills beside decodes
        {"num_kv_blocks": 32, "max_model_len": 200},  # preemption by recompute
    ],
    ids=["prefix-cache", "no-prefix-cache", "chunked", "tiny-pool"],
)
def test_alone_equals_among_64_others(model, kw):
    alone = llm(model).generate([TARGET], TARGET_PARAMS)[0].outputs[0].token_ids
    engine = llm(model, **kw)
    prompts = [*OTHERS[:32], TARGET, *OTHERS[32:]]
    params = [*OTHER_PARAMS[:32], TARGET_PARAMS, *OTHER_PARAMS[32:]]
    outs = engine.generate(prompts, params)
    assert outs[32].outputs[0].token_ids == alone
    for _prompt, p, out in zip(prompts, params, outs, strict=True):
        assert len(out.outputs[0].token_ids) == p.max_tokens
    if "num_kv_blocks" in kw:
        assert engine.engine.scheduler.num_preemptions > 0
    if not kw:
        assert engine.engine.block_manager.num_hit_blocks > 0
    # Each of a few others, alone, matches its batched output too.
    for i in (0, 5, 40):
        j = i if i < 32 else i + 1
        (single,) = llm(model).generate([prompts[j]], params[j])
        assert single.outputs[0].token_ids == outs[j].outputs[0].token_ids


def test_default_model_alone_equals_among_others():
    big = LLM(None, device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=200)
    r = random.Random(3)
    prompts = [[r.randrange(100, 40000) for _ in range(r.randint(4, 60))] for _ in range(16)]
    params = [
        SamplingParams(temperature=0, max_tokens=r.randint(4, 16), ignore_eos=True) for _ in prompts
    ]
    target = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = big.generate([prompts[0]], target)[0].outputs[0].token_ids
    outs = big.generate(prompts, [target, *params[1:]])
    assert outs[0].outputs[0].token_ids == alone
