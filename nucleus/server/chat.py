"""`POST /v1/chat/completions`: messages through the model's chat format, `n` choices, streamed
as chunks with `delta`s or answered whole; chat-shaped `logprobs`; `tools` and `tool_choice`
(`nucleus.tools`): calls come back in `message.tool_calls` / `delta.tool_calls` with finish reason
"tool_calls".

While streaming a reply that may turn out to be tool calls (any reply under `"required"` or a
named choice; under `"auto"`, one that starts like JSON), the text is held back until it is
known: the calls then come in one `delta.tool_calls`, or the held text as content.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nucleus.outputs import CompletionOutput
from nucleus.server.inputs import (
    check_context,
    check_ids,
    check_model,
    check_sequences,
    check_text_length,
    sampling_params,
)
from nucleus.server.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ToolCallDelta,
    ToolCallOut,
    Usage,
    random_id,
)
from nucleus.server.responses import chat_logprobs, json_safe, usage
from nucleus.server.run import Prompt, Run, collect, raise_if_error
from nucleus.server.sse import ChunkEvents, SSEResponse, sse
from nucleus.server.state import ServerState
from nucleus.tools import (
    ToolCall,
    ToolRequest,
    may_become_tool_call,
    parse_tool_choice,
    parse_tools,
)

__all__ = ["create_chat_completion"]


def _tool_request(req: ChatCompletionRequest) -> ToolRequest | None:
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise APIError.bad_request("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    try:
        tools = parse_tools(req.tools)
    except ValueError as exc:
        raise APIError.bad_request(f"Invalid 'tools': {exc}", param="tools") from None
    try:
        choice = parse_tool_choice(req.tool_choice, tools)
    except ValueError as exc:
        raise APIError.bad_request(f"Invalid 'tool_choice': {exc}", param="tool_choice") from None
    return ToolRequest(tools, choice, req.parallel_tool_calls is not False)


def _calls(request: ToolRequest | None, o: CompletionOutput) -> list[ToolCall] | None:
    if request is None or o.finish_reason not in ("stop", "length"):
        return None
    return request.parse(o.text)


def _finish_reason(o: CompletionOutput, calls: list[ToolCall] | None) -> str | None:
    """ "tool_calls" for a reply of calls, unless the token budget cut it ("length")."""
    return "tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason


@dataclass
class _ChoiceStream:
    """What one streamed choice has sent, and the text it holds back."""

    chars: int = 0
    tokens: int = 0
    finished: bool = False
    holding: bool = False
    held: str = ""
    held_logprobs: list[dict[str, Any]] = field(default_factory=list)


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest, request: Request
) -> Response:
    arrival = time.perf_counter()
    model = check_model(state, req.model)
    tools = _tool_request(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError.bad_request(
            "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs"
        )
    max_tokens, max_param = req.requested_max_tokens()
    if max_tokens == 0:
        raise APIError.bad_request(f"'{max_param}' must be at least 1.", param=max_param)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(
        state,
        req,
        max_tokens=max_tokens,
        logprobs=k,
        prompt_logprobs=None,
        rename={"max_tokens": max_param, "logprobs": "top_logprobs"},
    )
    check_sequences(state, 1, params.n, "n")
    messages = [m.as_dict() for m in req.messages]
    # The rendered prompt holds every message's text: a check before rendering and tokenizing.
    chars = sum(len((m["content"] or "").strip()) for m in messages)
    check_text_length(state, chars, "messages")
    shown = tools.prompt_tools if tools is not None else None
    try:
        ids = list(await state.off_loop(state.engine.encode_chat, messages, shown))
    except (ValueError, TypeError, KeyError) as exc:
        raise APIError.bad_request(f"Invalid messages: {exc}", param="messages") from None
    check_ids(state, ids, "messages")
    check_context(state, len(ids), max_tokens, "messages", max_param)
    if tools is not None:
        try:
            params = tools.sampling_params(params, state.engine.chat_format)
        except ValueError as exc:
            raise APIError.bad_request(str(exc), param="tool_choice") from None
    rid = random_id("chatcmpl")
    created = int(time.time())
    run = Run(state, [Prompt(None, ids)], params, rid, arrival)
    run.start()

    if req.stream:
        return SSEResponse(
            _stream(state, req, run, tools, rid, created, model, len(ids), k), run, rid
        )

    finals = await collect(run, request)
    out = finals[0]
    raise_if_error(out)
    choices = []
    for o in sorted(out.outputs, key=lambda o: o.index):
        lps = None
        if k is not None:
            lps = {"content": chat_logprobs(state, o.token_ids, o.logprobs, k)}
        calls = _calls(tools, o)
        if calls:
            message = ChatMessageOut(
                tool_calls=[ToolCallOut.model_validate(c.to_openai()) for c in calls]
            )
        else:
            message = ChatMessageOut(content=o.text)
        choices.append(
            ChatChoice(
                index=o.index,
                message=message,
                logprobs=lps,
                finish_reason=_finish_reason(o, calls),
            )
        )
    body = ChatCompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=choices,
        usage=Usage(**usage(len(ids), sum(len(o.token_ids) for o in out.outputs))),
    )
    return JSONResponse(json_safe(body.model_dump()))


async def _stream(
    state: ServerState,
    req: ChatCompletionRequest,
    run: Run,
    tools: ToolRequest | None,
    rid: str,
    created: int,
    model: str,
    prompt_tokens: int,
    k: int | None,
) -> AsyncIterator[str]:
    include_usage = req.wants_usage_in_stream()
    hold_all = tools is not None and tools.choice.mode in ("required", "named")
    hold_json = tools is not None and tools.choice.mode == "auto"

    head = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }
    events = ChunkEvents(head, {"usage": None} if include_usage else {})

    def chunk(index: int, delta: dict[str, Any], lps: Any = None, finish: str | None = None):
        return events({"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish})

    choices: dict[int, _ChoiceStream] = {}
    completion_tokens: dict[int, int] = {}
    async for _, out in run.events():
        raise_if_error(out)
        for o in out.outputs:
            c = choices.get(o.index)
            if c is None:
                c = choices[o.index] = _ChoiceStream(holding=hold_all or hold_json)
                yield chunk(o.index, {"role": "assistant", "content": ""})
            if c.finished:
                continue
            text = o.text[c.chars :]
            new_ids = o.token_ids[c.tokens :]
            lps = []
            if k is not None and new_ids:
                lps = chat_logprobs(state, new_ids, (o.logprobs or [])[c.tokens :], k)
            c.chars, c.tokens = max(c.chars, len(o.text)), len(o.token_ids)
            completion_tokens[o.index] = len(o.token_ids)
            if c.holding:
                c.held += text
                c.held_logprobs += lps
                if hold_json and not may_become_tool_call(c.held):
                    c.holding = False  # plain content after all: send what was held
                    text, lps = c.held, c.held_logprobs
            if not c.holding and (text or lps):
                yield chunk(o.index, {"content": text}, {"content": lps} if k is not None else None)
            if o.finish_reason is None:
                continue
            c.finished = True
            finish = o.finish_reason
            if c.holding:
                calls = _calls(tools, o)
                held_lps = {"content": c.held_logprobs} if k is not None else None
                if calls:
                    deltas = [
                        ToolCallDelta(index=j, **call.to_openai()).model_dump()
                        for j, call in enumerate(calls)
                    ]
                    yield chunk(o.index, {"tool_calls": deltas}, held_lps)
                    finish = _finish_reason(o, calls)
                elif c.held or c.held_logprobs:
                    yield chunk(o.index, {"content": c.held}, held_lps)
            yield chunk(o.index, {}, None, finish)
    if include_usage:
        yield sse(
            {**head, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens.values()))}
        )
