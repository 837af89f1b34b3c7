"""Every route and every parameter, through the official `openai` client (sync, async, streaming),
against a real server process serving the default model."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


def _greedy(client, **kw):
    kw.setdefault("model", client._test_model)
    return client.completions.create(temperature=0, **kw)


@pytest.fixture(scope="module", autouse=True)
def _model_name(client, server):
    client._test_model = server.model


# ---------------------------------------------------------------------------------- plain routes


def test_health_and_models(server, client):
    r = httpx.get(f"{server.base_url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert models.data[0].object == "model"
    assert client.models.retrieve(server.model).id == server.model


def test_metrics_exposition(server, client):
    _greedy(client, prompt=PROMPT, max_tokens=2)
    text = server.metrics()
    for name in (
        "nucleus_requests_total",
        "nucleus_prompt_tokens_total",
        "nucleus_generation_tokens_total",
        "nucleus_requests_running",
        "nucleus_requests_waiting",
        "nucleus_kv_cache_usage_ratio",
        "nucleus_time_to_first_token_seconds_bucket",
        "nucleus_inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    assert server.metric("nucleus_requests_total", 'route="/v1/completions",status="200"') >= 1
    assert server.metric("nucleus_prompt_tokens_total") > 0
    assert server.metric("nucleus_generation_tokens_total") >= 2
    assert server.metric("nucleus_time_to_first_token_seconds_count") >= 1
    assert server.metric("nucleus_inter_token_latency_seconds_count") >= 1


# ---------------------------------------------------------------------------------- completions


def test_completion_basic_usage_and_length(client):
    r = _greedy(client, prompt=PROMPT, max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and isinstance(choice.text, str)
    assert r.usage.prompt_tokens > 0
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.usage.completion_tokens == 5:
        assert choice.finish_reason == "length"
    else:
        assert choice.finish_reason == "stop"


def test_completion_greedy_is_deterministic(client):
    a = _greedy(client, prompt=PROMPT, max_tokens=6)
    b = _greedy(client, prompt=PROMPT, max_tokens=6)
    assert a.choices[0].text == b.choices[0].text


def test_completion_prompt_forms(client):
    ids = [504, 3458, 314, 2914, 30]
    r = _greedy(client, prompt=ids, max_tokens=2)
    assert r.usage.prompt_tokens == len(ids) and len(r.choices) == 1
    r = _greedy(client, prompt=[ids, ids[:3]], max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(ids) + 3
    r = _greedy(client, prompt=["Hello", "One, two,"], max_tokens=2, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(1 for _ in r.choices) * 2 or all(
        c.finish_reason in ("stop", "length") for c in r.choices
    )


def test_completion_n_seed_sampling(client):
    kw = dict(model=client._test_model, prompt=PROMPT, max_tokens=6, temperature=1.0, top_p=0.9)
    a = client.completions.create(n=3, seed=1234, **kw)
    b = client.completions.create(n=3, seed=1234, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_completion_stop(client):
    base = _greedy(client, prompt=PROMPT, max_tokens=12).choices[0].text
    assert len(base) >= 4, base
    stop = base[2:4]
    r = _greedy(client, prompt=PROMPT, max_tokens=12, stop=[stop, "@@@@"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    r = _greedy(client, prompt=PROMPT, max_tokens=12, stop=stop)
    assert r.choices[0].text == base[: base.index(stop)]


def test_completion_logit_bias_forces_token(client):
    token = 2914
    r = _greedy(client, prompt=PROMPT, max_tokens=4, logit_bias={str(token): 100}, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 4
    assert len(set(lp.tokens)) == 1  # the same (biased) token every time


def test_completion_logprobs(client):
    r = _greedy(client, prompt=PROMPT, max_tokens=4, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) >= chosen - 1e-4  # greedy: the chosen one is the best


def test_completion_echo(client):
    r = _greedy(client, prompt=PROMPT, max_tokens=3, echo=True)
    assert r.choices[0].text.startswith(PROMPT)
    r = _greedy(client, prompt=PROMPT, max_tokens=3, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[r.usage.prompt_tokens] == len(PROMPT)  # the generated text's start
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    r = _greedy(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0


def test_completion_other_parameters_accepted(client):
    r = client.completions.create(
        model=client._test_model,
        prompt=PROMPT,
        max_tokens=3,
        temperature=0.7,
        top_p=0.5,
        presence_penalty=1.5,
        frequency_penalty=-0.5,
        seed=7,
        user="user-42",
        best_of=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_stream(client):
    full = _greedy(client, prompt=PROMPT, max_tokens=6)
    stream = _greedy(
        client,
        prompt=PROMPT,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        full.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_n_and_echo(client):
    stream = _greedy(client, prompt=["A", "B"], max_tokens=3, n=2, echo=True, stream=True)
    texts: dict[int, str] = {}
    finished = set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1, 2, 3}
    assert texts[0].startswith("A") and texts[3].startswith("B")


def test_stream_sse_wire_format(server):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=body, headers=server.headers, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


# ---------------------------------------------------------------------------------- chat


def test_chat_basic(client):
    r = client.chat.completions.create(
        model=client._test_model, messages=CHAT, max_completion_tokens=6, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert 1 <= r.usage.completion_tokens <= 6
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_max_tokens_and_system_message(client):
    messages = [{"role": "system", "content": "You are terse."}, *CHAT]
    r = client.chat.completions.create(
        model=client._test_model, messages=messages, max_tokens=2, temperature=0
    )
    assert r.usage.completion_tokens <= 2
    if r.usage.completion_tokens == 2:
        assert r.choices[0].finish_reason == "length"
    longer = client.chat.completions.create(
        model=client._test_model, messages=messages, max_tokens=2, temperature=0
    )
    assert r.usage.prompt_tokens == longer.usage.prompt_tokens
    wordy = [{"role": "system", "content": "You are terse. " * 10}, *CHAT]
    r2 = client.chat.completions.create(
        model=client._test_model, messages=wordy, max_tokens=2, temperature=0
    )
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_chat_content_parts_and_multi_turn(client):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Say one word."},
    ]
    r = client.chat.completions.create(
        model=client._test_model, messages=messages, max_tokens=3, temperature=0
    )
    assert r.choices[0].message.content is not None


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=client._test_model,
        messages=CHAT,
        max_completion_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4
        assert entry.bytes == list(entry.token.encode())
    r = client.chat.completions.create(
        model=client._test_model, messages=CHAT, max_tokens=2, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


def test_chat_n_seed_penalties_user(client):
    kw = dict(
        model=client._test_model,
        messages=CHAT,
        max_tokens=5,
        n=2,
        seed=99,
        temperature=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"2914": -100},
        stop=["\n\n"],
        user="u1",
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_stream(client):
    kw = dict(model=client._test_model, messages=CHAT, max_tokens=6, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, logprobs=True, **kw
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    n_lp = sum(
        len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs
    )
    assert n_lp == full.usage.completion_tokens


# ---------------------------------------------------------------------------------- async client


def test_async_client_concurrent_and_streaming(server):
    async def main():
        async with openai.AsyncOpenAI(
            api_key=server.api_key, base_url=f"{server.base_url}/v1", max_retries=0
        ) as ac:
            results = await asyncio.gather(
                *[
                    ac.chat.completions.create(
                        model=server.model, messages=CHAT, max_tokens=3, temperature=0
                    )
                    for _ in range(4)
                ],
                ac.completions.create(model=server.model, prompt=PROMPT, max_tokens=3),
            )
            texts = {r.choices[0].message.content for r in results[:4]}
            assert len(texts) == 1  # greedy, batched together: the same answer
            stream = await ac.completions.create(
                model=server.model, prompt=PROMPT, max_tokens=4, stream=True, temperature=0
            )
            pieces = [c.choices[0].text async for c in stream if c.choices]
            full = await ac.completions.create(
                model=server.model, prompt=PROMPT, max_tokens=4, temperature=0
            )
            assert "".join(pieces) == full.choices[0].text
            models = await ac.models.list()
            assert models.data[0].id == server.model

    asyncio.run(main())
