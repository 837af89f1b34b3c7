"""Structured outputs and tool calls through the official `openai` client, against a real server
process serving the default model (SmolLM2-135M-Instruct, whose chat template does not read
`tools`: the tools go in its system message).

Oracles: pydantic validates what `client.beta.chat.completions.parse` returns (the client builds
the strict JSON Schema from the model class and parses the reply itself); `jsonschema` validates
tool arguments against each tool's `parameters`; Python's `re` checks regular expressions.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

CHAT = [{"role": "user", "content": "Describe a small town in a few words, as JSON."}]


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


Short = Field(min_length=1, max_length=24)


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Town(BaseModel):
    name: str = Short
    population: int = Field(ge=0, le=1_000_000)


class Address(BaseModel):
    street: str = Short
    city: str = Short


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=120)
    address: Address


class Palette(BaseModel):
    colors: list[Color] = Field(min_length=1, max_length=3)


class Reading(BaseModel):
    celsius: float = Field(ge=-50, le=60)
    ok: bool


class MaybeNick(BaseModel):
    name: str = Short
    nickname: str | None = Field(max_length=16)


class Polygon(BaseModel):
    points: list[Point] = Field(min_length=1, max_length=3)


class Mode(BaseModel):
    mode: Literal["fast", "slow"]
    level: int = Field(ge=1, le=5)


class Tags(BaseModel):
    tags: list[str] = Field(max_length=3)
    primary: Color


class Order(BaseModel):
    item: str = Short
    quantity: int = Field(ge=1, le=10)
    express: bool
    note: str | None = Field(max_length=16)


class Nested(BaseModel):
    town: Town
    mayor: Person | None


SCHEMAS = [Town, Person, Palette, Reading, MaybeNick, Polygon, Mode, Tags, Order, Nested]


@pytest.mark.parametrize("model_class", SCHEMAS, ids=[c.__name__ for c in SCHEMAS])
def test_parse_returns_a_valid_object(client, server, model_class):
    completion = client.beta.chat.completions.parse(
        model=server.model,
        messages=CHAT,
        response_format=model_class,
        temperature=0,
        max_completion_tokens=300,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, model_class)
    model_class.model_validate_json(choice.message.content)  # and again, from the raw text


def test_json_object_mode_gives_an_object(client, server):
    r = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        response_format={"type": "json_object"},
        temperature=0.7,
        seed=4,
        max_completion_tokens=120,
        n=2,
    )
    for choice in r.choices:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def test_vllm_guided_fields_on_completions(client, server):
    regex = r"[0-9]{3}-[0-9]{4}"
    r = client.completions.create(
        model=server.model,
        prompt="My phone number is",
        temperature=1.0,
        seed=1,
        max_tokens=20,
        n=2,
        extra_body={"guided_regex": regex},
    )
    assert all(re.fullmatch(regex, c.text) for c in r.choices), r.choices
    r = client.completions.create(
        model=server.model,
        prompt="Is the sky blue? Answer:",
        max_tokens=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].text in ("yes", "no")
    schema = {**Mode.model_json_schema(), "additionalProperties": False}
    r = client.completions.create(
        model=server.model,
        prompt="Settings:",
        temperature=0,
        max_tokens=40,
        extra_body={"guided_json": schema},
    )
    Mode.model_validate_json(r.choices[0].text)
    r = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        temperature=0,
        max_completion_tokens=10,
        extra_body={"guided_grammar": 'start: "town=" /[a-z]{3,8}/'},
    )
    assert re.fullmatch(r"town=[a-z]{3,8}", r.choices[0].message.content)


# Without "additionalProperties": false a schema lets the model add keys of its own, and a small
# model then writes keys until its budget runs out.
STRICT_TOWN = {**Town.model_json_schema(), "additionalProperties": False}


def test_stream_with_a_schema_joins_to_a_valid_object(client, server):
    stream = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "town", "schema": STRICT_TOWN},
        },
        temperature=0,
        max_completion_tokens=100,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Town.model_validate_json(text)


# ---------------------------------------------------------------------------------- tools

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 30},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_required_tool_choice_returns_valid_calls(client, server):
    r = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0.8,
        seed=2,
        n=3,
        max_completion_tokens=120,
    )
    for choice in r.choices:
        # The small model may repeat calls until the budget ends: the complete ones count.
        assert choice.finish_reason in ("tool_calls", "length")
        assert choice.message.content is None
        check_calls(choice.message.tool_calls)


def test_required_tool_choice_streamed(client, server):
    stream = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_completion_tokens=120,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert chunks[-1].choices[0].finish_reason in ("tool_calls", "length")
    assert not any(d.content for d in deltas)
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [c.index for c in calls] == list(range(len(calls)))
    check_calls(calls)


def test_parallel_tool_calls_false_gives_one_call(client, server):
    r = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=5,
        n=3,
        max_completion_tokens=120,
    )
    for choice in r.choices:
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_named_tool_choice_calls_that_function(client, server):
    choice = {"type": "function", "function": {"name": "add"}}
    for stream in (False, True):
        r = client.chat.completions.create(
            model=server.model,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,
            max_completion_tokens=60,
            stream=stream,
        )
        if stream:
            calls = [call for c in r if c.choices for call in c.choices[0].delta.tool_calls or []]
        else:
            assert r.choices[0].finish_reason == "tool_calls"
            calls = r.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["add"]
        check_calls(calls)


def test_tool_choice_none_answers_in_content(client, server):
    """OpenAI: with "none" the model does not call a tool and writes a message."""
    for stream in (False, True):
        r = client.chat.completions.create(
            model=server.model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="none",
            temperature=0,
            max_completion_tokens=24,
            stream=stream,
        )
        if stream:
            chunks = [c for c in r if c.choices]
            assert not any(c.choices[0].delta.tool_calls for c in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert r.choices[0].message.tool_calls is None
            assert r.choices[0].message.content
            assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_auto_returns_calls_or_content(client, server):
    """OpenAI: with "auto" the model picks; either way the answer is well formed."""
    r = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        temperature=0.9,
        seed=11,
        n=4,
        max_completion_tokens=80,
    )
    for choice in r.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            check_calls(choice.message.tool_calls)
        else:
            assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_tool_results_in_the_history(client, server):
    """The assistant's earlier call and the tool's result go back in; the model answers."""
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    r = client.chat.completions.create(
        model=server.model,
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_completion_tokens=16,
    )
    assert r.choices[0].message.content
    bad = [*history[:1], {**history[1], "tool_calls": [{**history[1]["tool_calls"][0]}]}]
    bad[1]["tool_calls"][0]["function"] = {"name": "add", "arguments": "{oops"}
    with pytest.raises(Exception) as info:
        client.chat.completions.create(model=server.model, messages=bad, max_completion_tokens=4)
    assert info.value.status_code == 400 and info.value.body["param"] == "messages"
