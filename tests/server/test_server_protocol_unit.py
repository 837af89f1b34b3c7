"""UNIT tests of the protocol and error mapping, in-process, over the FAKE engine
(server_fake_engine.py). They check the server's own logic fast; the end-to-end tests against a
real server with the real engine are the other test_server_*.py files."""

from __future__ import annotations

import asyncio
import json

import pytest
from server_fake_engine import FakeAsyncLLM
from starlette.testclient import TestClient

from nucleus.server.app import build_app
from nucleus.server.limits import ServerLimits
from nucleus.server.protocol import APIError, validation_error
from nucleus.server.sse import ChunkEvents

KEY = {"Authorization": "Bearer k"}


@pytest.fixture
def fake():
    return FakeAsyncLLM(max_model_len=64)


@pytest.fixture
def app_client(fake):
    with TestClient(build_app(fake, served_model_name=["m", "alias"], api_key="k")) as c:
        yield c


def test_param_names_from_validation_locs():
    def param(loc):
        return validation_error([{"type": "x", "loc": loc, "msg": "bad"}]).param

    assert param(("body", "temperature")) == "temperature"
    assert param(("body", "messages", 2, "role")) == "messages[2].role"
    assert param(("body", "prompt", "list[int]", 0)) == "prompt"
    assert param(("body", "stream_options", "include_usage")) == "stream_options.include_usage"
    assert param(("body", "logit_bias", "12")) == "logit_bias"
    err = validation_error([{"type": "missing", "loc": ("body", "prompt"), "msg": "x"}])
    assert err.status == 400 and "Missing required parameter" in err.message


def test_error_body_shape():
    body = APIError.model_not_found("x").body()
    assert body == {
        "error": {
            "message": "The model `x` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_sampling_params_mapping(app_client, fake):
    r = app_client.post(
        "/v1/chat/completions",
        headers=KEY,
        json={
            "model": "alias",
            "messages": [
                {"role": "developer", "content": "be nice"},
                {"role": "user", "content": "x"},
            ],
            "max_completion_tokens": 3,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "stop": ["zz"],
            "seed": 5,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "logit_bias": {"7": 3},
            "logprobs": True,
            "top_logprobs": 4,
            "top_k": 3,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    _, params = fake.submitted[-1]
    assert (params.n, params.max_tokens, params.temperature, params.top_p) == (2, 3, 0.5, 0.9)
    assert params.stop_strings == ["zz"] and params.seed == 5 and params.logit_bias == {7: 3.0}
    assert (params.presence_penalty, params.frequency_penalty) == (0.1, 0.2)
    assert params.logprobs == 4 and params.prompt_logprobs is None
    assert params.top_k == 3 and params.ignore_eos
    r = app_client.post(
        "/v1/completions",
        headers=KEY,
        json={"model": "m", "prompt": "hi", "max_tokens": 2, "logprobs": 2, "echo": True},
    )
    assert r.status_code == 200
    _, params = fake.submitted[-1]
    assert params.logprobs == 2 and params.prompt_logprobs == 2


def test_chat_default_budget_is_rest_of_context(app_client, fake):
    r = app_client.post(
        "/v1/chat/completions", headers=KEY, json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 200
    _, params = fake.submitted[-1]
    assert params.max_tokens is None


def test_context_limit_names_the_field(app_client):
    r = app_client.post(
        "/v1/chat/completions",
        headers=KEY,
        json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 60},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_completion_tokens"
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_engine_value_error_is_400(app_client, fake):
    async def refuse(prompt, params, request_id):
        raise ValueError("SamplingParams.top_k must be sane")
        yield  # pragma: no cover

    fake.generate = refuse
    r = app_client.post("/v1/completions", headers=KEY, json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_engine_crash_is_500_in_openai_shape_and_server_survives(app_client, fake):
    original = fake.generate

    async def crash(prompt, params, request_id):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    fake.generate = crash
    r = app_client.post("/v1/completions", headers=KEY, json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = app_client.post(
        "/v1/completions", headers=KEY, json={"prompt": "x", "max_tokens": 1, "stream": True}
    )
    lines = [ln for ln in r.text.splitlines() if ln]
    assert '"server_error"' in lines[0] and lines[-1] == "data: [DONE]"
    fake.generate = original
    r = app_client.post("/v1/completions", headers=KEY, json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 200


def test_metrics_registry_is_per_app(fake):
    a = TestClient(build_app(fake, served_model_name="a"))
    b = TestClient(build_app(fake, served_model_name="b"))
    a.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert (
        'nucleus_requests_total{route="/v1/completions",status="200"} 1.0' in a.get("/metrics").text
    )
    assert 'route="/v1/completions"' not in b.get("/metrics").text


def test_queue_bound_counts_sequences_503_with_retry_after_or_400_if_it_never_fits(fake):
    client = TestClient(build_app(fake, served_model_name="m", limits=ServerLimits(max_waiting=4)))
    fake.stats = lambda: {"waiting_sequences": 3}
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
    assert r.headers["retry-after"] == "1"
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})  # 3 + 1 fits
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": ["x"] * 3, "max_tokens": 1, "n": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "too_many_sequences" and err["param"] == "n"
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "n": 5}
    err = client.post("/v1/chat/completions", json=chat).json()["error"]
    assert err["code"] == "too_many_sequences" and err["param"] == "n"


@pytest.mark.parametrize("prompt", [b'"x"', b'["x", "y"]'])
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_request(stream, prompt):
    """The app's own disconnect path: a client hanging up (mid-stream, or while waiting for a
    whole answer) aborts the engine requests (one prompt's stream is read directly, several
    prompts' through a task each)."""
    fake = FakeAsyncLLM(max_model_len=4096, delay=0.01)
    app = build_app(fake, served_model_name="m")

    async def main():
        sent: list[dict] = []
        disconnect = asyncio.Event()
        body = b'{"prompt": %s, "max_tokens": 1000, "stream": %s}' % (
            prompt,
            b"true" if stream else b"false",
        )
        if not stream:
            asyncio.get_running_loop().call_later(0.2, disconnect.set)
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            chunks = [m for m in sent if m["type"] == "http.response.body"]
            if len(chunks) >= 3:
                disconnect.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        await asyncio.wait_for(app(scope, receive, send), 10)
        return sent

    sent = asyncio.run(main())
    if stream:
        assert sent[0]["status"] == 200
    else:
        assert sent == []  # nobody to answer
    assert len(fake.aborted) == prompt.count(b'"') // 2 and not fake.active


def test_engine_queue_full_and_dead_are_503(app_client, fake):
    from nucleus.async_llm import EngineDeadError, QueueFull

    original = fake.generate
    for exc, code in ((QueueFull("full"), "server_overloaded"), (EngineDeadError("gone"), None)):

        def refuse(prompt, params, request_id, exc=exc):
            raise exc  # AsyncLLM raises these at once, before iterating

        fake.generate = refuse
        r = app_client.post("/v1/completions", headers=KEY, json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_error"
        if code:
            assert r.json()["error"]["code"] == code
    fake.generate = original
    assert app_client.get("/health").status_code == 200
    fake.is_running = False  # AsyncLLM's engine thread has stopped
    r = app_client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "engine not running"


@pytest.mark.parametrize("tail", [{}, {"usage": None}])
def test_chunk_events_encode_the_whole_chunk(tail):
    """A chunk event is the chunk's JSON (oracle: `json.loads`, and the bytes of `json.dumps` of
    the whole chunk, as events were written before the constant part was encoded once), with
    infinite log-probabilities at OpenAI's floor."""
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m\u00e9"}
    events = ChunkEvents(head, tail)
    plain = {"index": 2, "text": 'a "b"\n\u2028\u00e9', "logprobs": None, "finish_reason": None}
    lps = {"tokens": ["a"], "token_logprobs": [float("-inf")], "top_logprobs": [{"a": -0.5}]}
    scored = {"index": 0, "text": "a", "logprobs": lps, "finish_reason": "stop"}
    for choice, safe in [
        (plain, plain),
        (scored, {**scored, "logprobs": {**lps, "token_logprobs": [-9999.0]}}),
    ]:
        event = events(choice)
        body = {**head, "choices": [safe], **tail}
        assert event.startswith("data: ") and event.endswith("\n\n")
        assert json.loads(event[6:]) == body
        dumped = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        assert event == f"data: {dumped}\n\n"


@pytest.mark.parametrize(
    "flag",
    ["--stream-interval", "--max-num-seqs", "--max-num-batched-tokens", "--tensor-parallel-size"],
)
def test_serve_flags_that_count_refuse_zero_at_the_command_line(flag, capsys):
    """0 would silently mean the engine's default: argparse refuses it, naming the flag."""
    import argparse

    from nucleus.server.serve import add_serve_arguments

    parser = add_serve_arguments(argparse.ArgumentParser())
    assert getattr(parser.parse_args([flag, "4"]), flag[2:].replace("-", "_")) == 4
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "0"])
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
