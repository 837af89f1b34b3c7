"""`POST /v1/completions`: prompts (text or token ids, one or many) x `n` choices, streamed as
server-sent events or answered whole; `echo` and legacy-shaped `logprobs`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nucleus.outputs import RequestOutput
from nucleus.server.inputs import (
    check_context,
    check_ids,
    check_model,
    check_sequences,
    check_text_length,
    sampling_params,
)
from nucleus.server.protocol import APIError, CompletionRequest, random_id
from nucleus.server.responses import completion_logprobs, json_safe, merge_logprobs, usage
from nucleus.server.run import Prompt, Run, collect, raise_if_error
from nucleus.server.sse import ChunkEvents, SSEResponse, sse
from nucleus.server.state import ServerState

__all__ = ["create_completion"]


async def create_completion(
    state: ServerState, req: CompletionRequest, request: Request
) -> Response:
    arrival = time.perf_counter()
    model = check_model(state, req.model)
    n = req.n or 1
    if req.suffix:
        raise APIError.bad_request("'suffix' is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != n:
        raise APIError.bad_request("'best_of' must equal 'n' (when given).", param="best_of")
    echo = bool(req.echo)
    max_tokens = req.max_tokens
    if max_tokens == 0 and not echo:
        raise APIError.bad_request(
            "'max_tokens' must be at least 1 (0 is allowed only with 'echo').", param="max_tokens"
        )
    discard = max_tokens == 0  # echo only: the prompt back, nothing generated
    k = req.logprobs
    params = sampling_params(
        state,
        req,
        max_tokens=1 if discard else max_tokens,
        logprobs=k,
        prompt_logprobs=k if (echo and k is not None) else None,
        rename={"prompt_logprobs": "logprobs"},
    )
    # The cheap checks first: the sequences asked for, each text's length; then tokenize.
    given = req.prompts()
    check_sequences(state, len(given), n, "n" if n > 1 else "prompt")
    for p in given:
        if isinstance(p, str):
            check_text_length(state, len(p), "prompt")
    tok = state.engine.tokenizer
    texts = [p for p in given if isinstance(p, str)]
    encoded = iter(await state.off_loop(lambda: [tok.encode_prompt(s) for s in texts]))
    prompts = [Prompt(p, next(encoded)) if isinstance(p, str) else Prompt(None, p) for p in given]
    for p in prompts:
        check_ids(state, p.ids, "prompt")
        check_context(state, len(p.ids), 1 if discard else max_tokens, "prompt", "max_tokens")
    rid = random_id("cmpl")
    created = int(time.time())
    run = Run(state, prompts, params, rid, arrival)
    run.start()

    def prompt_text(p: Prompt) -> str:
        if p.text is not None:
            return p.text
        try:
            return tok.decode(p.ids)
        except Exception:
            return ""

    def prompt_part(p: Prompt, out: RequestOutput) -> tuple[str, dict[str, list] | None, int]:
        text = prompt_text(p)
        if k is None:
            return text, None, len(text)
        hidden = p.text is not None and p.ids[0] == getattr(tok, "bos_id", None)
        lps, offset = completion_logprobs(
            state, p.ids, out.prompt_logprobs, k, 0, first_is_none=True, first_is_hidden=hidden
        )
        return text, lps, offset

    if req.stream:
        include_usage = req.wants_usage_in_stream()
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        chunk = ChunkEvents(head, {"usage": None} if include_usage else {})

        async def stream() -> AsyncIterator[str]:
            seen: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) sent
            offsets: dict[int, int] = {}
            completion_tokens: dict[int, int] = {}
            ended: set[int] = set()  # choices whose finishing chunk has gone out
            async for i, out in run.events():
                raise_if_error(out)
                for o in out.outputs:
                    index = i * n + o.index
                    if index in ended:
                        continue  # a request's later outputs repeat its finished choices
                    text, lps = "", None
                    if index not in seen:
                        seen[index] = (0, 0)
                        offsets[index] = 0
                        if echo:
                            text, lps, offsets[index] = prompt_part(prompts[i], out)
                    chars, ntok = seen[index]
                    if not discard:
                        text += o.text[chars:]
                        new_ids = o.token_ids[ntok:]
                        if k is not None and new_ids:
                            more, offsets[index] = completion_logprobs(
                                state, new_ids, (o.logprobs or [])[ntok:], k, offsets[index]
                            )
                            lps = merge_logprobs(lps, more)
                        seen[index] = (max(chars, len(o.text)), len(o.token_ids))
                        completion_tokens[index] = len(o.token_ids)
                    finish = o.finish_reason
                    if finish is not None:
                        ended.add(index)
                        if discard:
                            finish = "length"
                    if not text and finish is None and lps is None:
                        continue
                    if k is not None and lps is None:
                        lps = completion_logprobs(state, [], None, k, 0)[0]
                    yield chunk(
                        {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}
                    )
            if include_usage:
                totals = usage(sum(len(p.ids) for p in prompts), sum(completion_tokens.values()))
                yield sse({**head, "choices": [], "usage": totals})

        return SSEResponse(stream(), run, rid)

    finals = await collect(run, request)
    choices = []
    completion_tokens = 0
    for i, p in enumerate(prompts):
        out = finals[i]
        raise_if_error(out)
        for o in sorted(out.outputs, key=lambda o: o.index):
            text, lps, offset = ("", None, 0)
            if echo:
                text, lps, offset = prompt_part(p, out)
            finish = o.finish_reason
            if discard:
                finish = "length"
            else:
                text += o.text
                completion_tokens += len(o.token_ids)
                if k is not None:
                    more, _ = completion_logprobs(state, o.token_ids, o.logprobs, k, offset)
                    lps = merge_logprobs(lps, more)
            choices.append(
                {
                    "index": i * n + o.index,
                    "text": text,
                    "logprobs": lps,
                    "finish_reason": finish,
                }
            )
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(sum(len(p.ids) for p in prompts), completion_tokens),
        "system_fingerprint": None,
    }
    return JSONResponse(json_safe(body))
