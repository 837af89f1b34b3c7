"""`nucleus.LLM` on a small random Llama 3 checkpoint (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import LLAMA3, random_meta_weights, write_meta_checkpoint

from nucleus.assets import asset_path
from nucleus.llm import LLM, normalize_prompts, resolve_dtype
from nucleus.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    ckpt = write_meta_checkpoint(
        tmp_path_factory.mktemp("llm"), LLAMA3, random_meta_weights(LLAMA3, seed=7)
    )
    return LLM(
        str(ckpt),
        tokenizer=asset_path("llama3-tokenizer"),
        device="cpu",
        dtype="float32",
        max_model_len=128,
        num_kv_blocks=64,
        block_size=8,
    )


def test_generate_accepts_every_prompt_shape_and_keeps_order(llm):
    ids = llm.tokenizer.encode("hello world", bos=True, eos=False)
    (by_text,) = llm.generate("hello world", GREEDY)
    (by_ids,) = llm.generate(ids, GREEDY)
    (by_dict,) = llm.generate({"prompt_token_ids": ids}, GREEDY)
    assert by_text.prompt == "hello world" and by_text.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_dict.outputs[0].token_ids == by_ids.outputs[0].token_ids
    outs = llm.generate(["a b c", ids, "zebra"], GREEDY)
    assert [o.prompt for o in outs] == ["a b c", None, "zebra"]
    assert outs[1].outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert len({o.request_id for o in outs}) == 3
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 6
        assert c.text == llm.tokenizer.decode(c.token_ids)
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_normalize_prompts():
    assert normalize_prompts("x") == ["x"]
    assert normalize_prompts([1, 2]) == [[1, 2]]
    assert normalize_prompts([[1, 2], "y"]) == [[1, 2], "y"]
    assert normalize_prompts({"prompt": "z"}) == ["z"]
    with pytest.raises(TypeError):
        normalize_prompts([1.5])


def test_per_prompt_params_logprobs_and_prompt_logprobs(llm):
    params = [
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=1),
    ]
    a, b = llm.generate(["one two", "three four five"], params)
    assert len(a.outputs[0].token_ids) == 3 and len(b.outputs[0].token_ids) == 5
    lps = a.outputs[0].logprobs
    assert len(lps) == 3
    for token, entry in zip(a.outputs[0].token_ids, lps, strict=True):
        assert token in entry and 1 <= len(entry) <= 3
        assert entry[token] == max(entry.values())  # greedy: the chosen token is the top one
    assert b.outputs[0].logprobs is None
    assert b.prompt_logprobs[0] is None and len(b.prompt_logprobs) == len(b.prompt_token_ids)
    assert all(b.prompt_token_ids[i] in b.prompt_logprobs[i] for i in range(1, 4))
    with pytest.raises(ValueError, match="one each"):
        llm.generate(["x", "y"], params[:1] * 3)


def test_stop_string_ends_with_finish_reason_stop(llm):
    (full,) = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("generated text has no usable stop string")
    (out,) = llm.generate(
        "the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=stop)
    )
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.find(stop)]


def test_chat_formats_conversations(llm):
    conv = [{"role": "user", "content": "hi"}]
    (one,) = llm.chat(conv, GREEDY)
    assert one.prompt_token_ids == llm.encode_chat(conv)
    two = llm.chat([conv, [*conv, {"role": "assistant", "content": "yo"}, *conv]], GREEDY)
    assert two[0].outputs[0].token_ids == one.outputs[0].token_ids
    assert len(two[1].prompt_token_ids) > len(one.prompt_token_ids)


def test_seeded_sampling_is_reproducible_and_n_completions(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=5, ignore_eos=True, n=2)
    (a,) = llm.generate("seeded", p)
    (b,) = llm.generate("seeded", p)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert [c.index for c in a.outputs] == [0, 1]


def test_a_refused_prompt_raises_and_leaves_the_engine_clean(llm):
    with pytest.raises(ValueError, match="context"):
        llm.generate(["fine", list(range(1, 200))], GREEDY)
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_used_blocks == 0 or llm.engine.config.enable_prefix_caching
    (ok,) = llm.generate("fine", GREEDY)
    assert ok.outputs[0].finish_reason == "length"


def test_a_text_that_cannot_fit_is_refused_before_it_is_tokenized(llm, monkeypatch):
    """The Llama 3 tokenizer's longest token is 128 bytes: (128 - 1) x 128 characters is the
    most a prompt can have in a context of 128 tokens. One more is refused without tokenizing."""
    assert llm.engine.max_prompt_chars == 127 * 128
    monkeypatch.setattr(llm.tokenizer, "encode_prompt", lambda s: pytest.fail("tokenized"))
    with pytest.raises(ValueError, match="characters"):
        llm.generate("x" * (127 * 128 + 1), GREEDY)
    assert not llm.engine.has_unfinished()


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int3", cpu)
