"""Fuzzed request bodies against a real server: always a 4xx or a 2xx, never a 5xx, never a crash.

Bodies are drawn by hypothesis: arbitrary JSON, raw bytes, and (mostly) objects built from the
routes' own field names with values of every type, plausible and not. Generation budgets are kept
tiny (`max_tokens` is always a small number or an invalid value) so that valid bodies run fast.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "echo", "user", "stream",
    "stream_options", "best_of", "suffix", "top_k", "min_p", "repetition_penalty", "min_tokens",
    "ignore_eos", "stop_token_ids", "skip_special_tokens",
]  # fmt: skip
CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "stream", "stream_options", "tools", "response_format", "top_k",
]  # fmt: skip

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-3, max_value=3),
    st.text(max_size=12),
    st.sampled_from(["", "text", "user", "assistant", "system", "auto", "json_object"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
small_budget = st.one_of(st.integers(min_value=1, max_value=3), json_value)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), json_value)},
    optional={
        "content": st.one_of(
            st.text(max_size=30),
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}
                ),
                max_size=2,
            ),
            json_value,
        ),
        "name": json_value,
    },
)
prompt = st.one_of(
    st.text(max_size=40),
    st.lists(st.text(max_size=10), max_size=3),
    st.lists(st.integers(min_value=-5, max_value=60000), max_size=12),
    st.lists(st.lists(st.integers(min_value=0, max_value=60000), max_size=6), max_size=3),
    json_value,
)


def _body(fields: list[str], required: dict, model: str) -> st.SearchStrategy:
    others = {f: json_value for f in fields if f not in required}
    others["model"] = st.one_of(st.just(model), json_value)
    others["n"] = st.one_of(st.integers(min_value=1, max_value=3), json_value)
    others["logit_bias"] = st.one_of(
        st.dictionaries(
            st.one_of(st.integers(-2, 60000).map(str), st.text(max_size=4)),
            st.one_of(st.floats(-150, 150), json_value),
            max_size=3,
        ),
        json_value,
    )
    others["stream_options"] = st.one_of(
        st.fixed_dictionaries({"include_usage": json_value}), json_value
    )
    return st.fixed_dictionaries(required, optional=others)


def _budgeted(body: object, route: str) -> object:
    """A valid generation budget must be tiny (hypothesis may still send an invalid one)."""
    if not isinstance(body, dict):
        return body
    keys = ("max_tokens", "max_completion_tokens") if "chat" in route else ("max_tokens",)
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 3:
            body[key] = 3
    if all(body.get(key) is None for key in keys):
        body[keys[-1]] = 2  # absent or null would mean "up to the context length"
    for key in ("n", "best_of"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 3:
            body[key] = 3
    return body


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120) as c:
        yield c


def _check(http: httpx.Client, route: str, content: bytes) -> None:
    with http.stream(
        "POST", route, content=content, headers={"content-type": "application/json"}
    ) as r:
        body = r.read()
    assert r.status_code < 500, (route, content[:300], r.status_code, body[:500])
    if r.status_code >= 400:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln for ln in body.decode().splitlines() if ln]
        assert lines[-1] == "data: [DONE]"
        assert not any("server_error" in ln for ln in lines), lines


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@SETTINGS
@given(data=st.data())
def test_fuzz_completions(server, http, data):
    required = {"prompt": prompt}
    body = data.draw(
        st.one_of(_body(COMPLETION_FIELDS, required, server.model), json_value), label="body"
    )
    _check(http, "/v1/completions", json.dumps(_budgeted(body, "completions")).encode())


@SETTINGS
@given(data=st.data())
def test_fuzz_chat(server, http, data):
    required = {"messages": st.one_of(st.lists(message, min_size=1, max_size=3), json_value)}
    body = data.draw(st.one_of(_body(CHAT_FIELDS, required, server.model), json_value))
    _check(http, "/v1/chat/completions", json.dumps(_budgeted(body, "chat/completions")).encode())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    raw=st.binary(max_size=64), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"])
)
def test_fuzz_raw_bytes(server, http, raw, route):
    _check(http, route, raw)


def test_openapi_document_and_alive_after_fuzz(server, http):
    doc = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    assert http.get("/health").status_code == 200
    assert server.alive()
    assert server.server_errors() == []
