"""Tool calling: OpenAI's `tools` and `tool_choice` on every model.

- **The prompt.** Llama 3 vocabularies (`nucleus.ChatFormat`) get the JSON tool format of Llama
  3.1, token for token what Meta's Hugging Face chat template for Llama 3.1 gives (tool
  definitions in the first user message, an `Environment: ipython` system header, tool results
  under the `ipython` role, calls replayed as `{"name": ..., "parameters": ...}`). Other models
  render their own chat template with `tools=`; a template that never reads `tools` gets the same
  instructions in its system message, so that the model knows the tools exist.
- **The choice.** `"none"`: the tools stay out of the prompt and the output is plain content.
  `"required"` and a named function are enforced by a JSON-Schema constraint (`tool_constraint`),
  so even a small model returns calls whose arguments validate: a list of
  `{"name", "parameters"}` objects for `"required"`, the function's arguments for a named one.
  `"auto"`: the model decides, and `parse_tool_calls` turns what it wrote into calls when it is
  one (`{"name", "parameters"}` objects, alone, in a list, separated by `;`, or in Hermes
  `<tool_call>` tags), plain content otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nucleus.sampling_params import SamplingParams, StructuredOutputsParams
from nucleus.tokenizer import ChatFormat

__all__ = [
    "LLAMA31_EOM_ID",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolRequest",
    "encode_tool_chat",
    "parse_tool_calls",
    "parse_tool_choice",
    "parse_tools",
    "tool_constraint",
]

# Llama 3.1's names for two of the Llama 3 vocabulary's reserved special tokens (Meta's
# llama-models tokenizer): the model ends a tool call with <|eom_id|> when it expects a result.
LLAMA31_EOM_ID = 128008  # "<|eom_id|>" ("<|reserved_special_token_4|>" in Llama 3)
LLAMA31_DATE = "26 Jul 2024"  # the template's default "Today Date"
_LLAMA31_INSTRUCTIONS = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
    "its value}.Do not use variables.\n\n"
)
_GENERIC_INSTRUCTIONS = (
    "You have access to the following functions. To call a function, respond only with JSON "
    'in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. Do not use variables.\n\n"
)


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # a JSON Schema of the arguments object
    spec: dict[str, Any]  # the definition as given (`{"type": "function", "function": {...}}`)


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the function, when named


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI sends it
    id: str = ""

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI `tools` (`[{"type": "function", "function": {"name", "description",
    "parameters"}}]`), checked.

    Raises:
        ValueError: a malformed definition; the message says which (`tools[i]...`).
    """
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise ValueError("tools must be a non-empty list of function definitions")
    out: list[Tool] = []
    for i, spec in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(spec, Mapping) or spec.get("type", "function") != "function":
            raise ValueError(f'{where} must be {{"type": "function", "function": {{...}}}}')
        fn = spec.get("function")
        if not isinstance(fn, Mapping):
            raise ValueError(f"{where}.function must be an object with a 'name'")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, _ . or -")
        if any(t.name == name for t in out):
            raise ValueError(f"{where}.function.name {name!r} is defined twice")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ValueError(f"{where}.function.parameters must be a JSON Schema object")
        out.append(Tool(name, dict(params), {"type": "function", "function": dict(fn)}))
    return out


def parse_tool_choice(choice: Any, tools: Sequence[Tool]) -> ToolChoice:
    """OpenAI `tool_choice`: "none", "auto", "required", or `{"type": "function", "function":
    {"name": ...}}`; None means "auto" with tools and "none" without.

    Raises:
        ValueError: anything else, or a function not among the tools.
    """
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(
                f"tool_choice must be 'none', 'auto', 'required' or a function, not {choice!r}"
            )
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return ToolChoice(choice)
    fn = choice.get("function") if isinstance(choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise ValueError(
            'tool_choice must name a function: {"type": "function", "function": {"name": ...}}'
        )
    if not any(t.name == name for t in tools):
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return ToolChoice("named", name)


def tool_constraint(
    tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool = True
) -> StructuredOutputsParams | None:
    """The JSON-Schema constraint that enforces a `"required"` or named choice (None otherwise)."""
    if choice.mode == "named":
        tool = next(t for t in tools if t.name == choice.name)
        return StructuredOutputsParams(json=tool.parameters)
    if choice.mode != "required":
        return None
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


# ---- the model's reply -> calls ------------------------------------------------------------
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), _call_id())


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` is made of: one value, or several separated by `;` or spaces."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            return values or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


def _array_items(text: str) -> list[Any]:
    """The complete items of a JSON array, even one cut short by the token budget."""
    decoder = json.JSONDecoder()
    pos = text.find("[") + 1
    items = []
    while 0 < pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        items.append(item)
    return items


def parse_tool_calls(
    text: str, tools: Sequence[Tool], choice: ToolChoice, *, parallel: bool = True
) -> list[ToolCall] | None:
    """The calls in a reply, or None when it is plain content.

    For `"required"` and named choices the reply was constrained to the calls' JSON (under
    `"required"`, the complete calls of a reply cut short by `max_tokens` count); for `"auto"` it
    is read as the model wrote it. `parallel=False` keeps the first call only.
    """
    if choice.mode == "none":
        return None
    if choice.mode == "named":
        try:
            args = json.loads(text)
        except ValueError:
            return None  # cut short (max_tokens): the text stands as content
        return [ToolCall(choice.name, json.dumps(args, ensure_ascii=False), _call_id())]
    names = {t.name for t in tools}
    if choice.mode == "required":
        objects = _array_items(text)
        calls = [_as_call(obj, names) for obj in objects]
        return [c for c in calls if c is not None][: None if parallel else 1] or None
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    blocks = _HERMES.findall(body) or [body]
    values = []
    for block in blocks:
        found = _json_values(block)
        if found is None:
            return None
        values += found
    objects = []
    for value in values:
        objects.extend(value if isinstance(value, list) else [value])
    calls = [_as_call(obj, names) for obj in objects]
    if not calls or any(c is None for c in calls):
        return None
    return calls if parallel else calls[:1]


def may_become_tool_call(text: str) -> bool:
    """While streaming with `"auto"`: could this start of a reply still turn into calls?"""
    head = text.lstrip().removeprefix(_PYTHON_TAG).lstrip()
    return not head or head[0] in "{[" or "<tool_call>".startswith(head[:11])


# ---- the prompt ----------------------------------------------------------------------------
def _arguments(call: Mapping[str, Any], where: str) -> tuple[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: a tool call needs function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):  # OpenAI sends the arguments as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ValueError(f"{where}: function.arguments is not valid JSON") from None
    return fn["name"], args


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with tool calls' arguments parsed (templates expect objects, OpenAI sends text)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                name, args = _arguments(call, f"messages[{i}].tool_calls[{j}]")
                calls.append({**call, "function": {"name": name, "arguments": args}})
            m["tool_calls"] = calls
        out.append(m)
    return out


def _llama31_call_text(message: Mapping[str, Any]) -> str:
    return "; ".join(
        '{"name": "'
        + call["function"]["name"]
        + '", "parameters": '
        + json.dumps(call["function"]["arguments"], ensure_ascii=False)
        + "}"
        for call in message["tool_calls"]
    )


def encode_llama31_tool_chat(
    chat: ChatFormat, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool]
) -> list[int]:
    """Llama 3.1's JSON tool format, laid out as Meta's Hugging Face template for Llama 3.1 lays it
    out (with its defaults: tools in the first user message, today's date 26 Jul 2024), each
    piece of text encoded as text between special tokens, as `ChatFormat` does.

    A reply holding several calls is replayed as the calls separated by "; " (the template
    allows one)."""
    tok = chat.tokenizer
    eot = tok.special_tokens["<|eot_id|>"]
    messages = list(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system = _content_text(messages.pop(0).get("content")).strip()

    def turn(role: str, text: str) -> list[int]:
        header = chat.encode_header({"role": role, "content": ""})
        return header + tok.encode(text, bos=False, eos=False) + [eot]

    ids = [tok.special_tokens["<|begin_of_text|>"]]
    ids += turn(
        "system",
        f"Environment: ipython\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {LLAMA31_DATE}\n\n{system}",
    )
    if not messages:
        raise ValueError("tools go in the first user message, and there is none")
    first = _content_text(messages.pop(0).get("content")).strip()
    definitions = "".join(json.dumps(t.spec, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    ids += turn("user", _LLAMA31_INSTRUCTIONS + definitions + first)
    for m in messages:
        if m.get("tool_calls"):
            ids += turn("assistant", _llama31_call_text(m))
        elif m["role"] in ("tool", "ipython"):
            content = m.get("content")
            ids += turn("ipython", json.dumps(content, ensure_ascii=False))
        else:
            ids += turn(m["role"], _content_text(m.get("content")).strip())
    return ids + chat.encode_header({"role": "assistant", "content": ""})


def _plain_tool_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool] | None
) -> list[dict[str, Any]]:
    """For a template that does not read `tools`: the definitions in the system message, calls
    replayed as their JSON text."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("tool_calls"):
            m["content"] = _llama31_call_text(m)
            del m["tool_calls"]
    if not tools:
        return out
    definitions = "".join(json.dumps(t.spec, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    if out and out[0]["role"] == "system":
        out[0]["content"] = _GENERIC_INSTRUCTIONS + definitions + _content_text(out[0]["content"])
    else:
        out.insert(0, {"role": "system", "content": (_GENERIC_INSTRUCTIONS + definitions).strip()})
    return out


def encode_tool_chat(
    chat: Any, messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool] | None
) -> list[int]:
    """A conversation's prompt ids with the tools the model may call (None: no tools)."""
    messages = normalize_messages(messages)
    if isinstance(chat, ChatFormat):
        if tools:
            return encode_llama31_tool_chat(chat, messages, tools)
        for m in messages:
            if m.get("tool_calls"):
                m["content"] = _llama31_call_text(m)
            m["content"] = _content_text(m.get("content"))
            if m["role"] == "tool":
                m["role"] = "ipython"
        return list(chat.encode_dialog_prompt(messages))
    if "tools" in chat.source:
        extra = {"tools": [t.spec for t in tools]} if tools else {}
        return list(chat.encode_dialog_prompt(messages, **extra))
    return list(chat.encode_dialog_prompt(_plain_tool_messages(messages, tools)))


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools, its choice among them, and what follows from them."""

    tools: list[Tool]
    choice: ToolChoice
    parallel: bool = True

    @classmethod
    def build(
        cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = True
    ) -> ToolRequest | None:
        """None when there are no tools and no choice; ValueError for bad definitions."""
        if not tools:
            if tool_choice in (None, "none"):
                return None
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        parsed = parse_tools(tools)
        choice = parse_tool_choice(tool_choice, parsed)
        return cls(parsed, choice, parallel_tool_calls is not False)

    @property
    def prompt_tools(self) -> list[Tool] | None:
        """The tools the prompt shows: none under "none"."""
        return None if self.choice.mode == "none" else self.tools

    def sampling_params(self, params: SamplingParams, chat: Any) -> SamplingParams:
        """`params` with the choice's constraint and, for Llama 3, <|eom_id|> as a stop token."""
        changes: dict[str, Any] = {}
        constraint = tool_constraint(self.tools, self.choice, parallel=self.parallel)
        if constraint is not None:
            if params.structured_outputs is not None:
                raise ValueError(
                    f"tool_choice {self.choice.mode!r} is enforced by a constraint of its own and "
                    "cannot be combined with structured_outputs (response_format)"
                )
            changes["structured_outputs"] = constraint
        if isinstance(chat, ChatFormat) and self.prompt_tools:
            changes["stop_token_ids"] = [*(params.stop_token_ids or ()), LLAMA31_EOM_ID]
        return dataclasses.replace(params, **changes) if changes else params

    def parse(self, text: str) -> list[ToolCall] | None:
        return parse_tool_calls(text, self.tools, self.choice, parallel=self.parallel)
