"""Tool calling: the Llama 3.1 tool prompt against Meta's own chat template, other templates, and
reading calls back out of replies.

Oracle for the Llama 3.1 prompts: transformers' `apply_chat_template` with Meta's Llama 3.1 chat
template (the `chat_template` of Meta's Hugging Face tokenizer_config.json, as llama.cpp keeps it
in `models/templates/`, fetched from the llama-cpp-python source archive on PyPI by sha256),
tokenized by transformers with the Llama 3 `tokenizer.json`: the token ids must be identical.
"""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from nucleus.assets import asset_path
from nucleus.chat_template import ChatTemplate
from nucleus.sampling_params import SamplingParams, StructuredOutputsParams
from nucleus.tokenizer import ChatFormat, Tokenizer
from nucleus.tools import (
    LLAMA31_EOM_ID,
    ToolChoice,
    ToolRequest,
    encode_tool_chat,
    parse_tool_calls,
    parse_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city, e.g. San Francisco"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Addiert zwei Zahlen — ganz genau",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}}


def call(name: str, args: dict, *, as_text: bool) -> dict:
    """An assistant message with one call; OpenAI sends the arguments as JSON text, the
    template's callers (transformers) as an object."""
    arguments = json.dumps(args) if as_text else args
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


def conversations(as_text: bool) -> list[tuple[list[dict], list[dict]]]:
    return [
        ([{"role": "user", "content": "What's the weather like in Paris?"}], [WEATHER]),
        (
            [
                {"role": "system", "content": "  You are terse.  "},
                {"role": "user", "content": "Add 2 and 40, then tell me the time.\n"},
            ],
            [WEATHER, ADD, NOW],
        ),
        (
            [
                {"role": "user", "content": "Weather in Oslo?"},
                call(
                    "get_current_weather", {"location": "Oslo", "unit": "celsius"}, as_text=as_text
                ),
                {"role": "tool", "tool_call_id": "c1", "content": "-3 degrees, snow"},
            ],
            [WEATHER],
        ),
        (
            [
                {"role": "system", "content": "Be helpful."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello. How can I help?"},
                {"role": "user", "content": "What is 17 + 25?"},
                call("add", {"a": 17, "b": 25}, as_text=as_text),
                {"role": "tool", "tool_call_id": "c1", "content": '{"result": 42}'},
                {"role": "assistant", "content": "It is 42."},
                {"role": "user", "content": "Thanks — and in Zürich, what's the weather? 🌧"},
            ],
            [ADD, WEATHER],
        ),
        (
            [
                {"role": "user", "content": "Time?"},
                call("now", {}, as_text=as_text),
                {"role": "tool", "tool_call_id": "c1", "content": '12:00 "noon"'},
            ],
            [NOW, ADD],
        ),
    ]


@pytest.fixture(scope="module")
def llama3() -> ChatFormat:
    return ChatFormat(Tokenizer(asset_path("llama3-tokenizer")))


@pytest.fixture(scope="module")
def meta_template() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(asset_path("llama3-tokenizer-json")), bos_token="<|begin_of_text|>"
    )
    tok.chat_template = asset_path("llama31-chat-template").read_text(encoding="utf-8")
    return tok


def oracle_ids(tok: PreTrainedTokenizerFast, messages: list[dict], tools: list[dict]) -> list[int]:
    text = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", range(5))
def test_llama31_tool_prompt_matches_metas_template(llama3, meta_template, case):
    messages, tools = conversations(as_text=True)[case]
    oracle_messages, _ = conversations(as_text=False)[case]
    ours = encode_tool_chat(llama3, messages, parse_tools(tools))
    assert ours == oracle_ids(meta_template, oracle_messages, tools)


def test_without_tools_the_llama3_prompt_is_unchanged(llama3):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    assert encode_tool_chat(llama3, messages, None) == llama3.encode_dialog_prompt(messages)


def test_llama3_tool_requests_stop_at_eom(llama3):
    request = ToolRequest.build([WEATHER], "auto")
    params = request.sampling_params(SamplingParams(stop_token_ids=[7]), llama3)
    assert params.stop_token_ids == [7, LLAMA31_EOM_ID]
    assert params.structured_outputs is None
    required = ToolRequest.build([WEATHER, ADD], "required").sampling_params(
        SamplingParams(), llama3
    )
    assert required.structured_outputs.json["type"] == "array"


TEMPLATE_WITH_TOOLS = (
    "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}|{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
)
TEMPLATE_WITHOUT_TOOLS = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
)


class CharTokenizer:
    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        return [ord(c) for c in s]


def text_of(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_a_template_that_reads_tools_gets_them():
    chat = ChatTemplate(TEMPLATE_WITH_TOOLS, "", "", CharTokenizer())
    ids = encode_tool_chat(chat, [{"role": "user", "content": "hi"}], parse_tools([WEATHER, ADD]))
    assert text_of(ids) == "TOOLS:get_current_weather,add|<user>hi<assistant>"


def test_a_template_that_ignores_tools_gets_them_in_the_system_message():
    chat = ChatTemplate(TEMPLATE_WITHOUT_TOOLS, "", "", CharTokenizer())
    messages = [
        {"role": "user", "content": "hi"},
        call("add", {"a": 1, "b": 2}, as_text=True),
        {"role": "tool", "content": "3"},
    ]
    text = text_of(encode_tool_chat(chat, messages, parse_tools([ADD])))
    assert text.startswith("<system>You have access to the following functions.")
    assert json.dumps(ADD, indent=4, ensure_ascii=False) in text
    assert text.endswith(
        '<user>hi<assistant>{"name": "add", "parameters": {"a": 1, "b": 2}}<tool>3<assistant>'
    )


def test_tool_definitions_and_choices_are_checked():
    with pytest.raises(ValueError, match=r"tools\[0\].function.name"):
        parse_tools([{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(ValueError, match="defined twice"):
        parse_tools([ADD, ADD])
    with pytest.raises(ValueError, match="not among the tools"):
        ToolRequest.build([ADD], {"type": "function", "function": {"name": "sub"}})
    with pytest.raises(ValueError, match="needs tools"):
        ToolRequest.build(None, "required")
    with pytest.raises(ValueError, match="cannot be combined"):
        ToolRequest.build([ADD], "required").sampling_params(
            SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)), None
        )
    assert ToolRequest.build(None, None) is None


TOOLS = parse_tools([WEATHER, ADD])
AUTO = ToolChoice("auto")


@pytest.mark.parametrize(
    ("reply", "calls"),
    [
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
        ('<|python_tag|>{"name": "add", "arguments": {"a": 1}}', [("add", {"a": 1})]),
        (
            '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_current_weather", '
            '"parameters": {"location": "Rome"}}',
            [("add", {"a": 1, "b": 2}), ("get_current_weather", {"location": "Rome"})],
        ),
        ('[{"name": "add", "parameters": "{\\"a\\": 5}"}]', [("add", {"a": 5})]),
        ('<tool_call>\n{"name": "add", "arguments": {"b": 3}}\n</tool_call>', [("add", {"b": 3})]),
        ("The weather is fine.", None),
        ('{"name": "subtract", "parameters": {}}', None),  # not a tool we offered
        ('{"answer": 42}', None),
        ('{"name": "add", "parameters": {"a": 1', None),  # cut short
    ],
)
def test_auto_reads_calls_or_content(reply, calls):
    got = parse_tool_calls(reply, TOOLS, AUTO)
    if calls is None:
        assert got is None
    else:
        assert [(c.name, json.loads(c.arguments)) for c in got] == calls
        assert all(c.id.startswith("call_") for c in got)


def test_required_keeps_complete_calls_and_named_takes_the_arguments():
    cut = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "add", "parame'
    got = parse_tool_calls(cut, TOOLS, ToolChoice("required"))
    assert [(c.name, c.arguments) for c in got] == [("add", '{"a": 1, "b": 2}')]
    two = '[{"name": "add", "parameters": {}}, {"name": "get_current_weather", "parameters": {}}]'
    assert len(parse_tool_calls(two, TOOLS, ToolChoice("required"), parallel=False)) == 1
    named = parse_tool_calls('{"a": 3, "b": 4}', TOOLS, ToolChoice("named", "add"))
    assert [(c.name, c.arguments) for c in named] == [("add", '{"a": 3, "b": 4}')]
    assert parse_tool_calls("anything", TOOLS, ToolChoice("none")) is None
