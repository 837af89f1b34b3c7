"""Turning a request's fields into engine inputs: the model name, token ids, the context limit,
and `SamplingParams` (whose refusals become 400s naming OpenAI's field)."""

from __future__ import annotations

import re
from typing import Any

from nucleus.engine.structured import grammar_for
from nucleus.sampling_params import SamplingParams, StructuredOutputsParams
from nucleus.server.protocol import APIError
from nucleus.server.state import ServerState

__all__ = [
    "check_context",
    "check_ids",
    "check_model",
    "sampling_params",
    "structured_outputs",
    "value_error",
]

_SP_FIELD = re.compile(r"SamplingParams\.(\w+)")


def check_model(state: ServerState, model: str | None) -> str:
    if model is None:
        return state.names[0]
    if model not in state.names:
        raise APIError.model_not_found(model)
    return model


def check_ids(state: ServerState, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError.bad_request("The prompt is empty.", param=param)
    vocab = state.vocab_size
    if vocab is not None:
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError.bad_request(
                    f"Token id {t} is out of range: the vocabulary has {vocab} tokens.",
                    param=param,
                )


def check_context(state: ServerState, n_prompt: int, max_tokens: int | None, kind: str, param: str):
    limit = state.max_model_len
    if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
        asked = n_prompt + (max_tokens or 0)
        raise APIError.bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{asked} tokens ({n_prompt} in the {kind}, {max_tokens or 0} in the completion). "
            f"Please reduce the length of the {kind} or completion.",
            param=param if n_prompt + (max_tokens or 0) > limit and n_prompt < limit else kind,
            code="context_length_exceeded",
        )


def sampling_params(
    state: ServerState,
    req: Any,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    rename: dict[str, str],
) -> SamplingParams:
    bias: dict[int, float] | None = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise APIError.bad_request(
                    f"Invalid key in 'logit_bias': {key!r} is not a token id.", param="logit_bias"
                ) from None
            if token < 0 or (state.vocab_size is not None and token >= state.vocab_size):
                raise APIError.bad_request(
                    f"Invalid key in 'logit_bias': token id {token} is out of range.",
                    param="logit_bias",
                )
            bias[token] = float(value)
    if req.stop_token_ids and state.vocab_size is not None:
        for t in req.stop_token_ids:
            if t >= state.vocab_size:
                raise APIError.bad_request(
                    f"Token id {t} in 'stop_token_ids' is out of range.", param="stop_token_ids"
                )
    stop = None if req.stop == [] else req.stop
    kwargs: dict[str, Any] = {
        "n": req.n if req.n is not None else 1,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": bias,
        "seed": req.seed,
        "stop": stop,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "top_k": -1 if req.top_k is None else req.top_k,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "min_tokens": req.min_tokens or 0,
        "ignore_eos": bool(req.ignore_eos),
        "stop_token_ids": req.stop_token_ids or None,
        "skip_special_tokens": req.skip_special_tokens is not False,
        "structured_outputs": structured_outputs(req),
    }
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise value_error(exc, rename) from None


def value_error(exc: ValueError, rename: dict[str, str] | None = None) -> APIError:
    match = _SP_FIELD.search(str(exc))
    param = None
    if match:
        param = match.group(1)
        param = (rename or {}).get(param, param)
    message = _SP_FIELD.sub(lambda m: (rename or {}).get(m.group(1), m.group(1)), str(exc))
    return APIError.bad_request(message, param=param)


_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_grammar": "grammar",
    "guided_choice": "choice",
}


def structured_outputs(req: Any) -> StructuredOutputsParams | None:
    """The request's output constraint: `response_format` (`json_object`, `json_schema`) or one
    of vLLM's `guided_*` fields; a constraint that does not compile is a 400 naming its field."""
    given = [name for name in ("response_format", *_GUIDED) if getattr(req, name) is not None]
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") == "text":
        given.remove("response_format")
    if not given:
        return None
    if len(given) > 1:
        raise APIError.bad_request(
            f"Give at most one output constraint, not {' and '.join(given)}.", param=given[1]
        )
    param = given[0]
    try:
        if param == "response_format":
            constraint = _response_format(fmt)
        else:
            constraint = StructuredOutputsParams(**{_GUIDED[param]: getattr(req, param)})
        grammar_for(constraint)
    except ValueError as exc:
        message = str(exc).removeprefix("StructuredOutputsParams: ")
        raise APIError.bad_request(f"Invalid '{param}': {message}", param=param) from None
    return constraint


def _response_format(fmt: dict[str, Any]) -> StructuredOutputsParams:
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ValueError("json_schema must be an object holding a 'schema' object")
    # OpenAI's `schema` is optional: without one, any JSON object.
    schema = spec.get("schema")
    if schema is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=schema)
