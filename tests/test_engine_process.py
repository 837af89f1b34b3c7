"""`AsyncLLM(engine_process=True)`: the engine in a child process (`nucleus.engine_process`), on
the default GGUF model (CPU).

Oracle: the offline `LLM` on the same model in this process (itself checked against llama.cpp in
tests/cpu): the same requests give the same tokens, text, logprobs (exactly: the same C kernels
run the same rows) and finish reasons. Then the paths that only a second process has: a request
error and an abort stay local and give the KV blocks back, the child killed ends every stream
with an error, shutdown ends it cleanly, and a model the child cannot build fails the
constructor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from nucleus.async_llm import AsyncLLM, EngineDeadError
from nucleus.engine_process import DeltaEncoder, OutputAssembler
from nucleus.llm import LLM
from nucleus.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nucleus.sampling_params import SamplingParams

OPTIONS = {"device": "cpu", "max_model_len": 128, "num_kv_blocks": 48, "block_size": 8}


@pytest.fixture(scope="module")
def llm():
    llm = AsyncLLM(engine_process=True, **OPTIONS)
    yield llm
    llm.shutdown()


async def collect(llm: AsyncLLM, prompt, params, rid=None) -> list[RequestOutput]:
    return [out async for out in llm.generate(prompt, params, rid)]


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_outputs_equal_the_offline_llm(llm):
    requests = [
        ("The capital of France is", SamplingParams(temperature=0, max_tokens=10, logprobs=2)),
        ([1, 504, 3575, 282], SamplingParams(temperature=0, max_tokens=24, stop=[" the"])),
        ("Once upon a time", SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=8)),
        ("Hi", SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1)),
    ]
    offline = LLM(**OPTIONS)
    expected = [offline.generate(prompt, params)[0] for prompt, params in requests]

    async def main():
        return await asyncio.gather(*(collect(llm, p, params) for p, params in requests))

    streams = asyncio.run(main())
    for stream, want in zip(streams, expected, strict=True):
        got = stream[-1]
        assert got.finished and not any(o.finished for o in stream[:-1])
        assert got.prompt == want.prompt and got.prompt_token_ids == want.prompt_token_ids
        assert got.prompt_logprobs == want.prompt_logprobs
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.text, g.token_ids, g.logprobs) == (w.text, w.token_ids, w.logprobs)
            assert (g.finish_reason, g.stop_reason) == (w.finish_reason, w.stop_reason)
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths)  # cumulative
    assert streams[1][-1].outputs[0].finish_reason == "stop"  # the stop string was met
    assert llm.in_process and llm.model_name == offline.model_name and llm.max_model_len == 128
    wait_until(lambda: llm.stats()["generation_tokens"] >= 10 + 8 * 2)


def test_an_error_and_an_abort_stay_local_and_free_the_blocks(llm):
    async def main():
        long = llm.generate("Tell me a story", SamplingParams(max_tokens=100, ignore_eos=True))
        first = await long.__anext__()
        too_long = asyncio.create_task(collect(llm, [5] * 200, SamplingParams(max_tokens=4)))
        ok = asyncio.create_task(collect(llm, "Hello", SamplingParams(max_tokens=5)))
        await long.aclose()  # a client gone: the request is aborted
        return first, await too_long, await ok

    first, too_long, ok = asyncio.run(main())
    assert not first.finished
    assert too_long[-1].outputs[0].finish_reason == "error"
    assert "context" in too_long[-1].outputs[0].error
    assert ok[-1].outputs[0].finish_reason == "length"
    wait_until(lambda: llm.stats()["running"] == 0 and llm.stats()["kv_cache_usage"] == 0.0)
    stats = llm.stats()
    assert stats["waiting"] == stats["waiting_sequences"] == stats["num_requests"] == 0
    assert stats["alive"] and stats["step_errors"] == 0


def test_a_killed_engine_process_ends_every_stream_with_an_error():
    llm = AsyncLLM(engine_process=True, **OPTIONS)

    async def main():
        stream = llm.generate("Count to a hundred", SamplingParams(max_tokens=100, ignore_eos=True))
        await stream.__anext__()
        os.kill(llm._process.process.pid, signal.SIGKILL)
        outputs = [out async for out in stream]
        with pytest.raises(EngineDeadError):
            llm.generate("again", SamplingParams(max_tokens=2))
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "error"
    assert "engine process exited" in outputs[-1].outputs[0].error
    assert not llm.stats()["alive"] and not llm.is_running
    llm.shutdown()


def test_shutdown_aborts_the_streams_and_ends_the_process():
    llm = AsyncLLM(engine_process=True, **OPTIONS)
    process = llm._process.process

    async def main():
        stream = llm.generate("Count to a hundred", SamplingParams(max_tokens=100, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(llm.shutdown)
        outputs = [out async for out in stream]
        with pytest.raises(EngineDeadError):
            llm.generate("again", SamplingParams(max_tokens=2))
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].finish_reason == "abort"
    assert process.exitcode == 0


def test_a_model_the_engine_process_cannot_build_fails_the_constructor():
    with pytest.raises(TypeError, match="no_such_option"):
        AsyncLLM(engine_process=True, no_such_option=1, **OPTIONS)


def test_deltas_rebuild_each_cumulative_output():
    """The wire alone: each output rebuilt from the deltas equals the engine's, and is a new
    object (the one yielded before it does not change)."""

    def output(text: str, ids: list[int], finished: bool = False) -> RequestOutput:
        logprobs = [{t: -0.5} for t in ids]
        c = CompletionOutput(0, text, ids, logprobs, "stop" if finished else None)
        return RequestOutput("r", None, [1, 2], [c], finished, metrics=RequestMetrics(1.0))

    steps = [output("a", [3]), output("ab", [3, 4]), output("abcd", [3, 4, 5, 6], True)]
    encoder, assembler = DeltaEncoder(), OutputAssembler("r", None, [1, 2])
    rebuilt = [assembler.apply(encoder.encode(out)) for out in steps]
    assert rebuilt == steps
    assert rebuilt[0].outputs[0].token_ids == [3]  # not grown by the later deltas
    assert encoder.encode(steps[2])[2][0][1] == [3, 4, 5, 6]  # a finished request is forgotten
