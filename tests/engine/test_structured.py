"""Structured outputs in the engine, on a tiny random model with the default model's real
vocabulary (SmolLM2's 49,152 tokens): whatever the random logits, the output is text the
constraint accepts.

Oracles: Python's `re.fullmatch` for regular expressions, `jsonschema` for JSON Schemas, `json`
for "any JSON object"; the engine's own unconstrained runs for the rows a constraint must not
touch (exact token ids); `torch.log_softmax` of the raw logits for logprobs (1e-5).
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch
from toy import tiny_model

from nucleus.assets import asset_path
from nucleus.async_llm import AsyncLLM
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.engine.structured import (
    StructuredOutputs,
    _bitmask_to_bias_numpy,
    bitmask_to_bias,
    grammar_for,
)
from nucleus.hf_tokenizer import HFTokenizer
from nucleus.loaders.gguf import read_gguf_metadata
from nucleus.sampling import Sampler, SamplingTensors
from nucleus.sampling_params import SamplingParams
from nucleus.sampling_params import StructuredOutputsParams as Constraint

V = 49152

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["ok", "size", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer.from_gguf(read_gguf_metadata(asset_path("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=V, dim=32, ffn=64, max_len=256, std=0.5, seed=0)


def make_engine(model, tokenizer, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("block_size", 8)
    kw.setdefault("max_model_len", 256)
    return LLMEngine(model, tokenizer, EngineConfig(**kw))


PROMPTS = ["The answer is", "Give me JSON:", "abc", "Hello there, how are you today?"]


def test_invalid_constraints_fail_with_the_compilers_message():
    with pytest.raises(ValueError, match=r"invalid JSON Schema: .*foo"):
        grammar_for(Constraint(json={"type": "foo"}))
    with pytest.raises(ValueError, match=r"(?s)invalid regular expression: .*unclosed group"):
        grammar_for(Constraint(regex="(ab"))
    with pytest.raises(ValueError, match=r"(?s)invalid grammar: .*unknown name"):
        grammar_for(Constraint(grammar="start: missing_rule"))
    with pytest.raises(ValueError, match="exactly one of"):
        Constraint(regex="a", json_object=True)
    with pytest.raises(ValueError, match="exactly one of"):
        Constraint()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        Constraint(choice=[])
    with pytest.raises(ValueError, match="not valid JSON text"):
        Constraint(json="{nope")
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


@pytest.mark.parametrize(
    ("constraint", "accepts"),
    [
        (Constraint(regex=r"[a-c]{2,6}(-[0-9]{2})?"), None),
        (Constraint(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
        (Constraint(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        (
            Constraint(grammar='start: "(" item ("," item)* ")"\nitem: /[xy]/'),
            lambda t: re.fullmatch(r"\([xy](,[xy])*\)", t) is not None,
        ),
        (
            Constraint(grammar='root ::= "[" [0-9] "]"'),  # GBNF (llama.cpp)
            lambda t: re.fullmatch(r"\[[0-9]\]", t) is not None,
        ),
    ],
)
def test_every_output_is_accepted_by_its_constraint(model, tokenizer, constraint, accepts):
    if accepts is None:
        accepts = lambda t: re.fullmatch(constraint.regex, t) is not None  # noqa: E731
    engine = make_engine(model, tokenizer)
    params = SamplingParams(
        temperature=1.0, seed=3, n=3, max_tokens=64, structured_outputs=constraint
    )
    for out in engine.generate(PROMPTS, params):
        for c in out.outputs:
            assert c.finish_reason == "stop", c
            assert accepts(c.text), c.text


def test_any_json_object_is_a_json_object(model, tokenizer):
    engine = make_engine(model, tokenizer)
    constraint = Constraint(json_object=True)
    # The random model writes long strings: a budget that ends some of them mid-object is fine,
    # what is written must be a prefix of an object, and finished ones must parse.
    params = SamplingParams(temperature=0, max_tokens=48, structured_outputs=constraint)
    outs = engine.generate(PROMPTS, params)
    for out in outs:
        c = out.outputs[0]
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def test_unconstrained_rows_get_the_tokens_they_get_alone(model, tokenizer):
    """Half the batch constrained: the other half's greedy tokens equal a run without them."""
    alone = make_engine(model, tokenizer).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    mixed_params = []
    for _ in PROMPTS:
        mixed_params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        mixed_params.append(
            SamplingParams(temperature=0, max_tokens=12, structured_outputs=Constraint(json=SCHEMA))
        )
    mixed = make_engine(model, tokenizer).generate(
        [p for p in PROMPTS for _ in range(2)], mixed_params
    )
    for i, out in enumerate(alone):
        assert mixed[2 * i].outputs[0].token_ids == out.outputs[0].token_ids


def test_constraint_state_follows_preemption(model, tokenizer):
    """A KV cache too small for the batch preempts and recomputes sequences; their matchers
    keep the accepted tokens, so the outputs equal those of a roomy cache."""
    constraint = Constraint(regex=r"[a-z ]{20,400}")
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=constraint)
    roomy = make_engine(model, tokenizer, max_model_len=128).generate(PROMPTS, params)
    tight_engine = make_engine(model, tokenizer, max_model_len=128, num_kv_blocks=16)
    tight = tight_engine.generate(PROMPTS, params)
    assert tight_engine.scheduler.num_preemptions > 0
    for a, b in zip(roomy, tight, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert re.fullmatch(r"[a-z ]*", b.outputs[0].text)
    assert tight_engine.block_manager.num_free_blocks == tight_engine.block_manager.num_blocks


def test_stop_strings_max_tokens_and_logprobs_still_apply(model, tokenizer):
    engine = make_engine(model, tokenizer)
    regex = Constraint(regex=r"ab+c+d")
    stopped, cut = engine.generate(
        ["x", "y"],
        [
            SamplingParams(temperature=0, stop=["c"], structured_outputs=regex),
            SamplingParams(temperature=0, max_tokens=2, structured_outputs=Constraint(json=SCHEMA)),
        ],
    )
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == "c"
    assert re.fullmatch(r"ab+", stopped.outputs[0].text)
    assert cut.outputs[0].finish_reason == "length"
    assert len(cut.outputs[0].token_ids) == 2


def test_a_complete_constraint_ends_the_output_without_a_stop_token(model, tokenizer):
    """Once nothing may follow, the sequence ends ("stop", no stop token sampled), even under
    min_tokens or ignore_eos; the other row of the batch goes on."""
    engine = make_engine(model, tokenizer)
    choice = Constraint(choice=["yes", "no"])
    outs = engine.generate(
        ["a", "b", "c"],
        [
            SamplingParams(temperature=0, min_tokens=5, structured_outputs=choice),
            SamplingParams(temperature=0, ignore_eos=True, structured_outputs=choice),
            SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        ],
    )
    for out in outs[:2]:
        assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].stop_reason is None
        assert out.outputs[0].text in ("yes", "no")
        assert tokenizer.decode(out.outputs[0].token_ids) == out.outputs[0].text
    assert outs[2].outputs[0].finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_both_bitmask_unpackings_give_the_same_bias():
    """The CPU's numpy unpacking (worker thread) and the device one (torch) agree, bit for bit,
    with the tokens set one by one; tokens past the vocabulary are dropped."""
    vocab = 70
    allowed = [0, 5, 31, 32, 33, 64, 69]
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for t in allowed:
        word = bitmask[0, t // 32].item() | (1 << (t % 32))
        bitmask[0, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
    bitmask[1] = -1  # every token
    expected = torch.full((2, vocab), float("-inf"))
    expected[0, allowed] = 0
    expected[1] = 0
    assert torch.equal(bitmask_to_bias(bitmask, vocab), expected)
    assert torch.equal(_bitmask_to_bias_numpy(bitmask, vocab), expected)


def test_sampler_masks_only_constrained_rows_and_keeps_raw_logprobs():
    torch.manual_seed(0)
    B, vocab = 3, 70
    logits = torch.randn(B, vocab)
    allowed_tokens = [5, 33, 64, 69]
    bias = torch.full((1, vocab), float("-inf"))
    bias[0, allowed_tokens] = 0
    params = [SamplingParams(temperature=0, logprobs=2)] * B
    st = SamplingTensors.build(params, vocab_size=vocab, allowed=(torch.tensor([1]), bias))
    out = Sampler()(logits, st)
    expected = logits.argmax(-1)
    expected[1] = allowed_tokens[int(logits[1, allowed_tokens].argmax())]
    assert out.token_ids.tolist() == expected.tolist()
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(
        out.logprobs, raw.gather(-1, expected[:, None])[:, 0], rtol=1e-5, atol=0
    )
    torch.testing.assert_close(out.top_logprobs, raw.topk(2, -1).values, rtol=1e-5, atol=0)
    sampled = Sampler()(
        logits,
        SamplingTensors.build(
            [SamplingParams(temperature=1.0, top_p=0.9)] * B,
            vocab_size=vocab,
            allowed=(torch.tensor([0, 2]), bias.expand(2, vocab)),
        ),
    )
    assert sampled.token_ids[0] in allowed_tokens and sampled.token_ids[2] in allowed_tokens


def test_masks_of_a_step_and_rows_with_nothing_allowed(tokenizer, monkeypatch):
    """Each constrained row gets its own mask, unconstrained rows none; a matcher that refused a
    token allows only the stop tokens; a mask with no bit set is reported (the runner then fails
    that row alone)."""
    structured = StructuredOutputs(tokenizer, V)
    good, bad = structured.matchers(Constraint(regex="[ab]+"), 2)
    assert "breaks the output constraint" in structured.accept(
        bad, tokenizer.encode("z", bos=False, eos=False)[0]
    )
    pending = structured.begin([good, None, bad], torch.device("cpu"))
    rows, bias = pending.wait("cpu")
    assert rows.tolist() == [0, 2] and pending.blocked == set()
    allowed = (bias[0] == 0).nonzero().flatten().tolist()
    assert allowed and all(re.fullmatch("[ab]+", tokenizer.decode([t])) for t in allowed)
    assert set((bias[1] == 0).nonzero().flatten().tolist()) == tokenizer.stop_tokens

    def fill_nothing(executor, jobs, bitmask):  # as if no token were allowed anywhere
        bitmask.zero_()

    monkeypatch.setattr("llguidance.torch.fill_next_token_bitmask_par", fill_nothing)
    pending = structured.begin([None, good], torch.device("cpu"))
    pending.wait("cpu")
    assert pending.blocked == {1}


def test_a_constraint_that_does_not_compile_fails_its_request_alone(model, tokenizer):
    """Through `AsyncLLM` (the server's face): the bad request ends with finish reason "error"
    and the compiler's message; the good one, added in the same breath, finishes."""
    llm = AsyncLLM.from_engine(make_engine(model, tokenizer))
    bad = SamplingParams(max_tokens=4, structured_outputs=Constraint(regex="a(b"))
    good = SamplingParams(temperature=0, max_tokens=4, structured_outputs=Constraint(regex="x+"))

    async def final(prompt, params, rid):
        async for out in llm.generate(prompt, params, rid):
            last = out
        return last

    async def main():
        return await asyncio.gather(final("a", bad, "bad"), final("b", good, "good"))

    try:
        bad_out, good_out = asyncio.run(main())
    finally:
        llm.shutdown()
    assert bad_out.outputs[0].finish_reason == "error"
    assert "invalid regular expression" in bad_out.outputs[0].error
    assert good_out.outputs[0].finish_reason in ("stop", "length")
    assert re.fullmatch("x+", good_out.outputs[0].text)


def test_no_step_is_launched_ahead_for_a_constrained_row(tokenizer, monkeypatch):
    """Async scheduling launches the next decode step before this one's tokens reach the host;
    a constrained row's next mask needs that token, so its batches are never launched ahead, and
    the outputs equal the synchronous loop's (the unconstrained row's launched-ahead steps
    included)."""
    from nucleus.kernels.triton import triton_usable
    from nucleus.ops.triton_ops import TritonOps

    if not triton_usable("cpu"):
        pytest.skip("Triton is not installed")
    requests = [
        ("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
        (
            "Hi",
            SamplingParams(
                temperature=0, max_tokens=12, structured_outputs=Constraint(regex="[a-z]{4,8}")
            ),
        ),
    ]
    runs = {}
    for overlap in (False, True):
        fresh = tiny_model(vocab_size=V, dim=32, ffn=64, max_len=64, std=0.5, seed=0)
        fresh.bind_kernels(ops=TritonOps(max_positions=64))
        e = make_engine(
            fresh, tokenizer, max_model_len=64, attention_backend="triton", async_scheduling=overlap
        )
        launches = []
        launch = e.runner.launch

        def spy(batch, after=None, masks=None, launch=launch, launches=launches):
            launches.append((after is not None, any(s.grammar is not None for s in batch.seqs)))
            return launch(batch, after, masks)

        monkeypatch.setattr(e.runner, "launch", spy)
        outs = e.generate([p for p, _ in requests], [sp for _, sp in requests])
        runs[overlap] = [o.outputs[0].token_ids for o in outs]
        assert re.fullmatch("[a-z]{4,8}", outs[1].outputs[0].text)
        assert not any(ahead and constrained for ahead, constrained in launches)
        if overlap:
            assert any(ahead for ahead, _ in launches)  # the unconstrained row alone, later
    assert runs[True] == runs[False]
