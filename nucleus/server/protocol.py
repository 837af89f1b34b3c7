"""OpenAI's wire format: request and response models (pydantic), with OpenAI's field names.

Requests are validated strictly (a boolean is not an integer, a string is not a number, NaN is
not a float) and every failure becomes an `APIError` of status 400 naming the offending `param`,
in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`. Fields OpenAI has and
nucleus does not use are accepted and ignored; vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`) and
its structured-output fields (`guided_json`, `guided_regex`, `guided_grammar`, `guided_choice`)
are accepted too, since clients send them through `extra_body`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "Usage",
    "error_body",
    "random_id",
    "validation_error",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP = 16


# --------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error the server answers in OpenAI's JSON shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    # The error classes the server gives, by name.
    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None):
        return cls(400, message, param=param, code=code)

    @classmethod
    def unauthorized(cls, message: str):
        return cls(401, message, code="invalid_api_key")

    @classmethod
    def model_not_found(cls, model: str):
        return cls(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    @classmethod
    def overloaded(cls, message: str):
        return cls(503, message, code="server_overloaded")


_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """`('body', 'messages', 0, 'content')` -> `'messages[0].content'`; union tags are dropped."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part in _KNOWN_FIELDS:
            out = f"{out}.{part}" if out else part
        else:
            break  # a pydantic union tag such as 'list[int]' or 'function-after[...]'
    return out or None


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """Turn pydantic's (or FastAPI's) validation errors into one 400 naming the first param."""
    if not errors:
        return APIError.bad_request("Invalid request body.")
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        return APIError.bad_request(
            "We could not parse the JSON body of your request. The request body must be valid "
            "JSON (" + str(first.get("ctx", {}).get("error", "invalid JSON")) + ")."
        )
    if kind in ("model_attributes_type", "dict_type", "model_type") and len(loc) <= 1:
        return APIError.bad_request("The request body must be a JSON object.")
    param = _param_from_loc(loc)
    if kind == "missing" and param:
        return APIError.bad_request(f"Missing required parameter: '{param}'.", param=param)
    msg = str(first.get("msg", "Invalid value"))
    where = f"'{param}'" if param else "the request body"
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 and param else ""
    return APIError.bad_request(f"Invalid value for {where}: {msg}{extra}.", param=param)


# --------------------------------------------------------------------------------------------
# Shared pieces

StrictInt = Annotated[int, Field(strict=True)]
Seed = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _Request(BaseModel):
    # Strict: no bool-as-int, no "1"-as-1; NaN and infinities are not numbers here.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Request):
    """Fields the two generation routes share."""

    model: str | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] | None = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Prob | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras, sent through `extra_body`.
    top_k: Annotated[int, Field(strict=True, ge=-1)] | None = None
    min_p: Prob | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[Annotated[int, Field(strict=True, ge=0)]] | None = None
    skip_special_tokens: bool | None = True
    # Structured outputs: OpenAI's `response_format`, or one of vLLM's `guided_*` fields.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None

    def wants_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --------------------------------------------------------------------------------------------
# /v1/completions

PromptType = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[StrictInt], Field(min_length=1)]
    | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: MaxTokens | None = 16
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# --------------------------------------------------------------------------------------------
# /v1/chat/completions


class ContentPartText(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPartText] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    def as_dict(self) -> dict[str, Any]:
        """The message as chat formats take it (`developer` is a system message)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text() if self.content is not None or not self.tool_calls else None,
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for and the name of the field that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


_KNOWN_FIELDS = (
    set(CompletionRequest.model_fields)
    | set(ChatCompletionRequest.model_fields)
    | set(ChatMessage.model_fields)
    | set(ToolCallIn.model_fields)
    | set(ToolCallFunction.model_fields)
    | set(StreamOptions.model_fields)
    | {"text", "type"}
)


# --------------------------------------------------------------------------------------------
# Responses (the routes build plain dicts in these shapes; the models document them)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nucleus"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ToolCallDelta(ToolCallOut):
    index: int  # the call's place among the choice's calls


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
