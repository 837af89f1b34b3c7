"""`POST /v1/chat/completions`: messages through the model's chat format, `n` choices, streamed
as chunks with `delta`s or answered whole; chat-shaped `logprobs`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nucleus.server.inputs import (
    check_context,
    check_ids,
    check_model,
    check_sequences,
    check_text_length,
    sampling_params,
)
from nucleus.server.protocol import APIError, ChatCompletionRequest, random_id
from nucleus.server.responses import chat_logprobs, json_safe, usage
from nucleus.server.run import Prompt, Run, collect, raise_if_error
from nucleus.server.sse import SSEResponse, guarded_sse, sse
from nucleus.server.state import ServerState

__all__ = ["create_chat_completion"]


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest, request: Request
) -> Response:
    arrival = time.perf_counter()
    model = check_model(state, req.model)
    if req.tools:
        raise APIError.bad_request("Tool calling is not supported.", param="tools")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise APIError.bad_request(
            f"response_format {fmt!r} is not supported (only 'text').", param="response_format"
        )
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
    messages = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": m.text()})
    # The rendered prompt holds every message's text: a check before rendering and tokenizing.
    check_text_length(state, sum(len(m["content"].strip()) for m in messages), "messages")
    try:
        ids = list(await state.off_loop(state.engine.encode_chat, messages))
    except (ValueError, TypeError, KeyError) as exc:
        raise APIError.bad_request(f"Invalid messages: {exc}", param="messages") from None
    check_ids(state, ids, "messages")
    check_context(state, len(ids), max_tokens, "messages", max_param)
    rid = random_id("chatcmpl")
    created = int(time.time())
    run = Run(state, [Prompt(None, ids)], params, rid, arrival)
    run.start()

    if req.stream:
        include_usage = req.wants_usage_in_stream()

        def chunk(choices: list[dict[str, Any]]) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = None
            return sse(json_safe(body))

        async def stream() -> AsyncIterator[str]:
            seen: dict[int, tuple[int, int]] = {}
            completion_tokens: dict[int, int] = {}
            ended: set[int] = set()  # choices whose finishing chunk has gone out
            async for _, out in run.events():
                raise_if_error(out)
                for o in out.outputs:
                    if o.index in ended:
                        continue  # later outputs repeat the choices already finished
                    if o.index not in seen:
                        seen[o.index] = (0, 0)
                        yield chunk(
                            [
                                {
                                    "index": o.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    chars, ntok = seen[o.index]
                    text = o.text[chars:]
                    new_ids = o.token_ids[ntok:]
                    seen[o.index] = (max(chars, len(o.text)), len(o.token_ids))
                    completion_tokens[o.index] = len(o.token_ids)
                    lps = None
                    if k is not None and new_ids:
                        lps = {
                            "content": chat_logprobs(state, new_ids, (o.logprobs or [])[ntok:], k)
                        }
                    if text or lps is not None:
                        yield chunk(
                            [
                                {
                                    "index": o.index,
                                    "delta": {"content": text},
                                    "logprobs": lps,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    if o.finish_reason is not None:
                        ended.add(o.index)
                        yield chunk(
                            [
                                {
                                    "index": o.index,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": o.finish_reason,
                                }
                            ]
                        )
            if include_usage:
                body = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage(len(ids), sum(completion_tokens.values())),
                }
                yield sse(body)

        return SSEResponse(guarded_sse(stream(), rid), run)

    finals = await collect(run, request)
    out = finals[0]
    raise_if_error(out)
    choices = []
    completion_tokens = 0
    for o in sorted(out.outputs, key=lambda o: o.index):
        completion_tokens += len(o.token_ids)
        lps = None
        if k is not None:
            lps = {"content": chat_logprobs(state, o.token_ids, o.logprobs, k)}
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lps,
                "finish_reason": o.finish_reason,
            }
        )
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(len(ids), completion_tokens),
        "system_fingerprint": None,
    }
    return JSONResponse(json_safe(body))
