"""Load: 36 concurrent streaming clients against a real server, some of them disconnecting at
random (mid-stream, right after the headers, or while waiting for a whole answer). Every other
client completes; afterwards the KV cache is back to empty and the server still answers."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
from server_helpers import wait_idle

N_CLIENTS = 36
MAX_TOKENS = 8
QUITTER_TOKENS = 256  # clients that hang up ask for long answers: only an abort ends them soon


async def _stream_chat(ac: openai.AsyncOpenAI, model: str, i: int, quit_after: int | None):
    stream = await ac.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Count from {i} upwards."}],
        max_tokens=MAX_TOKENS if quit_after is None else QUITTER_TOKENS,
        extra_body={"ignore_eos": quit_after is not None},
        temperature=0.8,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks = "", None, None, 0
    async for chunk in stream:
        chunks += 1
        if quit_after is not None and chunks >= quit_after:
            await stream.close()  # hang up mid-stream
            return "disconnected", None
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    return "done", (text, finish, usage)


async def _stream_completion(ac: openai.AsyncOpenAI, model: str, i: int, quit_after: int | None):
    stream = await ac.completions.create(
        model=model,
        prompt=f"{i} little pigs",
        max_tokens=MAX_TOKENS if quit_after is None else QUITTER_TOKENS,
        stream=True,
        seed=i,
        extra_body={"ignore_eos": quit_after is not None},
    )
    text, finish, chunks = "", None, 0
    async for chunk in stream:
        chunks += 1
        if quit_after is not None and chunks >= quit_after:
            await stream.close()
            return "disconnected", None
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return "done", (text, finish, None)


async def _impatient(base_url: str, headers: dict, model: str, i: int):
    """A non-streaming client that gives up (disconnects) before its answer is ready."""
    body = {
        "model": model,
        "prompt": f"Story {i}:",
        "max_tokens": QUITTER_TOKENS,
        "ignore_eos": True,
    }
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=headers) as c:
            await c.post("/v1/completions", json=body, timeout=0.3)
    except httpx.TimeoutException:
        return "disconnected", None
    return "done", None


def test_concurrent_streams_with_random_disconnects(server):
    rng = random.Random(1234)
    quitters = set(rng.sample(range(N_CLIENTS), N_CLIENTS // 4))  # hang up mid-stream
    impatient = set(rng.sample(sorted(set(range(N_CLIENTS)) - quitters), 3))
    plan = []
    for i in range(N_CLIENTS):
        if i in quitters:
            plan.append(("stream", i, rng.randint(1, 4)))
        elif i in impatient:
            plan.append(("impatient", i, None))
        else:
            plan.append(("stream", i, None))

    async def main():
        async with openai.AsyncOpenAI(
            api_key=server.api_key,
            base_url=f"{server.base_url}/v1",
            max_retries=0,
            timeout=180,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=128)),
        ) as ac:
            tasks = []
            for kind, i, quit_after in plan:
                if kind == "impatient":
                    tasks.append(_impatient(server.base_url, server.headers, server.model, i))
                elif i % 2:
                    tasks.append(_stream_chat(ac, server.model, i, quit_after))
                else:
                    tasks.append(_stream_completion(ac, server.model, i, quit_after))
            return await asyncio.gather(*tasks)

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    completed = 0
    for (kind, i, quit_after), (status, payload) in zip(plan, results, strict=True):
        if kind == "stream" and quit_after is None:
            assert status == "done", (i, status)
            text, finish, usage = payload
            assert isinstance(text, str)
            assert finish in ("stop", "length"), (i, finish)
            if usage is not None:
                assert 1 <= usage.completion_tokens <= MAX_TOKENS
            completed += 1
    assert completed >= N_CLIENTS // 2

    # Every aborted request has given its KV blocks back; nothing runs or waits any more.
    assert wait_idle(server, timeout=30) == (0, 0, 0), server.log()[-3000:]

    # ... and the server still answers.
    assert server.alive()
    sync = openai.OpenAI(api_key=server.api_key, base_url=f"{server.base_url}/v1", max_retries=0)
    r = sync.completions.create(model=server.model, prompt="Hello", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "Traceback" not in server.log()
    assert server.server_errors() == []
    assert server.log().count("client disconnected") >= len(quitters) + len(impatient)
    print(f"\n{N_CLIENTS} clients in {elapsed:.1f}s, {completed} completed")
