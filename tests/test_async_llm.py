"""`nucleus.AsyncLLM` over the engine on a tiny random model (CPU): streaming, abort, errors that
end one request alone, a failing engine step, the bounded queue and shutdown."""

from __future__ import annotations

import asyncio

import pytest
from toy import ToyTokenizer, tiny_model

from nucleus.async_llm import AsyncLLM, EngineDeadError, QueueFull
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.model import Transformer
from nucleus.sampling_params import SamplingParams

V = 64


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(vocab_size=V, dim=32, ffn=64, max_len=64, std=0.3, seed=0)


def make(model, max_waiting=None) -> AsyncLLM:
    engine = LLMEngine(model, ToyTokenizer(V), EngineConfig(num_kv_blocks=64, block_size=4))
    return AsyncLLM.from_engine(engine, model_name="toy", max_waiting=max_waiting)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def collect(llm: AsyncLLM, prompt, params, rid=None):
    return [out async for out in llm.generate(prompt, params, rid)]


def test_streams_cumulative_outputs_equal_to_offline(model):
    offline = LLMEngine(model, ToyTokenizer(V), EngineConfig(num_kv_blocks=64, block_size=4))
    expected = offline.generate([[5, 6, 7]], greedy(8))[0].outputs[0].token_ids
    llm = make(model)

    async def main():
        return await asyncio.gather(
            collect(llm, [5, 6, 7], greedy(8), "a"), collect(llm, "hello", greedy(5), "b")
        )

    a, b = asyncio.run(main())
    assert a[-1].finished and not any(o.finished for o in a[:-1])
    assert a[-1].outputs[0].token_ids == expected and a[-1].outputs[0].finish_reason == "length"
    lengths = [len(o.outputs[0].token_ids) for o in a]
    assert lengths == sorted(lengths)  # cumulative
    assert b[-1].outputs[0].finish_reason == "length" and b[-1].prompt == "hello"
    assert llm.model_name == "toy" and llm.max_model_len == 64
    assert {"running", "waiting", "kv_cache_usage"} <= set(llm.stats())
    llm.shutdown()


def test_abort_and_a_refused_request_end_alone(model):
    llm = make(model)

    async def main():
        long = llm.generate([9] * 4, SamplingParams(max_tokens=50, ignore_eos=True), "long")
        bad = asyncio.create_task(collect(llm, [2] * 70, greedy(4), "bad"))
        ok = asyncio.create_task(collect(llm, [3, 4], greedy(6), "ok"))
        first = await long.__anext__()
        llm.abort("long")
        rest = [o async for o in long]
        return first, rest, await bad, await ok

    first, rest, bad, ok = asyncio.run(main())
    assert not first.finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(bad) == 1 and bad[0].outputs[0].finish_reason == "error"
    assert "context" in bad[0].outputs[0].error
    assert ok[-1].outputs[0].finish_reason == "length"
    llm.shutdown()


def test_a_failing_step_fails_running_requests_and_the_loop_goes_on(model, monkeypatch):
    llm = make(model)
    launch = llm.engine.runner.launch
    calls = {"n": 0}

    def flaky(batch, after=None, masks=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return launch(batch, after, masks)

    monkeypatch.setattr(llm.engine.runner, "launch", flaky)

    async def main():
        failed = await collect(llm, [5, 6], greedy(6), "x")
        later = await collect(llm, [5, 6], greedy(3), "y")
        return failed, later

    failed, later = asyncio.run(main())
    assert failed[-1].outputs[0].finish_reason == "error"
    assert "boom" in failed[-1].outputs[0].error
    assert later[-1].outputs[0].finish_reason == "length"
    assert llm.stats()["step_errors"] == 1 and llm.stats()["alive"]
    assert llm.engine.block_manager.num_used_blocks == 0 or llm.engine.config.enable_prefix_caching
    llm.shutdown()


def test_queue_full_leaving_early_and_shutdown(model):
    llm = make(model, max_waiting=0)

    async def full():
        with pytest.raises(QueueFull):
            llm.generate([5], greedy(2))

    asyncio.run(full())
    llm.shutdown()
    llm = make(model)

    async def main():
        stream = llm.generate([7, 8], SamplingParams(max_tokens=60, ignore_eos=True), "gone")
        await stream.__anext__()
        await stream.aclose()  # the client left: the request is aborted
        pending = llm.generate([7, 8], SamplingParams(max_tokens=60, ignore_eos=True), "s")
        await pending.__anext__()
        llm.shutdown()
        return [o async for o in pending]

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].finish_reason == "abort"
    assert not llm.engine.requests

    async def after():
        with pytest.raises(EngineDeadError):
            llm.generate([5], greedy(2))

    asyncio.run(after())
