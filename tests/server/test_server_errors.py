"""Every error class, in OpenAI's JSON shape with the right status, against a real server."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest
from server_helpers import MAX_WAITING, SHUTDOWN_TIMEOUT, ServerProcess

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Hi"}]


def _post(server: ServerProcess, path: str, body, headers=None, **kw) -> httpx.Response:
    headers = server.headers if headers is None else headers
    if isinstance(body, (bytes, str)):
        return httpx.post(
            server.base_url + path,
            content=body,
            headers={**headers, "content-type": "application/json"},
            timeout=60,
        )
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---------------------------------------------------------------------------------- 401


def test_401_missing_or_wrong_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        err = _error(httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=10), 401)
        assert err["code"] == "invalid_api_key"
        body = {"model": server.model, "prompt": "x", "max_tokens": 1}
        _error(_post(server, "/v1/completions", body, headers=headers), 401)
    # a bad key wins over a bad body
    _error(_post(server, "/v1/chat/completions", b"{not json", headers={}), 401)
    bad = openai.OpenAI(api_key="wrong", base_url=f"{server.base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=server.model, messages=CHAT, max_tokens=1)
    assert info.value.status_code == 401
    # health and metrics need no key
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/metrics", timeout=10).status_code == 200


# ---------------------------------------------------------------------------------- 404


def test_404_unknown_model(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert info.value.status_code == 404
    err = info.value.body
    assert err["param"] == "model" and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    _error(httpx.get(f"{server.base_url}/v1/nothing-here", headers=server.headers), 404)
    err = _error(httpx.get(f"{server.base_url}/v1/completions", headers=server.headers), 405)
    assert err["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------- 400


BAD_COMPLETIONS = [
    ({"temperature": 3.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"logprobs": 50}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"echo": "yes"}, "echo"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 3}}, "stream_options.include_usage"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"model": 5}, "model"),
    ({"user": 5}, "user"),
    ({"suffix": "tail"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"top_k": -5}, "top_k"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ({"guided_json": {"type": "object", "minProperties": "two"}}, "guided_json"),
]


@pytest.mark.parametrize(("patch", "param"), BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_400_completions_names_param(server, patch, param):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 2, **patch}
    err = _error(_post(server, "/v1/completions", body), 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": 3}, "logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": -4}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"n": 1000}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
        "tool_choice",
    ),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
    ),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "tool_choice",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
        "response_format",
    ),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"stop": ["a"] * 100}, "stop"),
]


@pytest.mark.parametrize(("patch", "param"), BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_400_chat_names_param(server, patch, param):
    body = {"model": server.model, "messages": CHAT, "max_tokens": 2, **patch}
    err = _error(_post(server, "/v1/chat/completions", body), 400)
    assert err["param"] == param, err


def test_400_through_openai_client(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=PROMPT, temperature=9)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=CHAT, top_logprobs=2, logprobs=False
        )
    assert info.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b'{"prompt": NaN}'],
    ids=["broken", "empty", "list", "string", "null", "binary", "nan"],
)
def test_400_malformed_bodies(server, body):
    for path in ("/v1/completions", "/v1/chat/completions"):
        err = _error(_post(server, path, body), 400)
        assert err["type"] == "invalid_request_error"


def test_400_context_length(server, client):
    limit = httpx.get(f"{server.base_url}/v1/models", headers=server.headers).json()["data"][0][
        "max_model_len"
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=limit)
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert str(limit) in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=CHAT, max_completion_tokens=limit
        )
    assert info.value.body["param"] == "max_completion_tokens"
    long_prompt = " hello" * (limit + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=long_prompt, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": long_prompt}]
        )
    assert info.value.body["param"] == "messages"
    # the server is still fine
    assert client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1).choices


def test_no_5xx_recorded(server):
    assert server.server_errors() == []


# ------------------------------------------------------------- 503 (queue full) and SIGTERM


def test_503_when_waiting_queue_full(server):
    """More requests waiting for the engine than the bound (MAX_WAITING) get 503."""
    # A single request bringing more prompts than the queue holds: always turned away.
    body = {"model": server.model, "prompt": ["x"] * (MAX_WAITING + 1), "max_tokens": 1}
    err = _error(_post(server, "/v1/completions", body), 503)
    assert err["code"] == "server_overloaded" and err["type"] == "server_error"

    # A burst: 30 requests of 8 prompts each at once; the queue holds 6 of them.
    async def one(ac: httpx.AsyncClient):
        body = {"model": server.model, "prompt": ["One, two,"] * 8, "max_tokens": 1}
        return await ac.post("/v1/completions", json=body, headers=server.headers, timeout=120)

    async def burst():
        async with httpx.AsyncClient(
            base_url=server.base_url, limits=httpx.Limits(max_connections=64)
        ) as ac:
            return await asyncio.gather(*[one(ac) for _ in range(30)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert _error(r, 503)["code"] == "server_overloaded"
        else:
            assert len(r.json()["choices"]) == 8
    sync = openai.OpenAI(api_key=server.api_key, base_url=f"{server.base_url}/v1", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:  # the client's class for 503
        sync.completions.create(model=server.model, prompt=["x"] * (MAX_WAITING + 1), max_tokens=1)
    assert info.value.status_code == 503
    assert sync.completions.create(model=server.model, prompt=PROMPT, max_tokens=1).choices
    assert server.metric("nucleus_requests_rejected_total", 'reason="queue_full"') >= 2


@pytest.mark.server_last
def test_sigterm_graceful_shutdown(server):
    """SIGTERM mid-stream: a short stream finishes cleanly, a long one is aborted when the
    shutdown timeout (SHUTDOWN_TIMEOUT) is up and still ends with finish_reason "abort" and
    [DONE]; new connections are refused; the process exits with status 0. (Runs last: it stops
    the shared server.)"""
    srv = server
    body = {
        "model": srv.model,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "extra": "ignored",
    }
    long_body = {**body, "max_tokens": 4000, "ignore_eos": True}
    long_lines: list[str] = []

    def read_long(r: httpx.Response) -> None:
        long_lines.extend(line for line in r.iter_lines() if line)

    lines: list[str] = []
    url = f"{srv.base_url}/v1/completions"
    with (
        httpx.stream("POST", url, json=long_body, headers=srv.headers, timeout=120) as long_r,
        httpx.stream("POST", url, json=body, headers=srv.headers, timeout=120) as r,
    ):
        assert r.status_code == 200 and long_r.status_code == 200
        it = r.iter_lines()
        for line in it:
            if line:
                lines.append(line)
                break
        reader = threading.Thread(target=read_long, args=(long_r,))
        reader.start()
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{srv.base_url}/health", timeout=5)
        lines += [line for line in it if line]
        reader.join(SHUTDOWN_TIMEOUT + 30)
        waited = time.monotonic() - start
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines), lines
    assert '"finish_reason":"abort"' not in "".join(lines)
    assert long_lines[-1] == "data: [DONE]", long_lines[-3:]
    assert '"finish_reason":"abort"' in long_lines[-2], long_lines[-3:]
    assert not any('"error"' in line for line in long_lines), long_lines[-3:]
    assert SHUTDOWN_TIMEOUT - 1 <= waited <= SHUTDOWN_TIMEOUT + 30, waited
    assert srv.proc.wait(60) == 0, srv.log()[-3000:]
    log = srv.log()
    assert "shutting down gracefully" in log
    assert "aborting 1 request(s) still running" in log
    assert "Traceback" not in log, log[-3000:]
