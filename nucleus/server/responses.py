"""Pieces of OpenAI's response bodies: usage, log-probabilities in OpenAI's two shapes, and
JSON-safe floats."""

from __future__ import annotations

from typing import Any

from nucleus.server.state import ServerState

__all__ = ["chat_logprobs", "completion_logprobs", "json_safe", "merge_logprobs", "usage"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _top(entry: dict[int, float] | None, k: int) -> list[tuple[int, float]]:
    if not entry or k <= 0:
        return []
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]


def completion_logprobs(
    state: ServerState,
    token_ids: list[int],
    entries: list[dict[int, float] | None] | None,
    k: int,
    offset: int,
    first_is_none: bool = False,
    first_is_hidden: bool = False,
) -> tuple[dict[str, list], int]:
    """OpenAI's legacy shape for a run of tokens; returns it and the text offset after them.

    `first_is_hidden`: the first token (a BOS the server added) is not in the text, so it
    takes no room in the text offsets."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for j, t in enumerate(token_ids):
        text = state.token_text(t)
        entry = entries[j] if entries is not None and j < len(entries) else None
        tokens.append(text)
        offsets.append(offset)
        if not (first_is_hidden and j == 0):
            offset += len(text)
        if (first_is_none and j == 0) or entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(float(entry.get(t, float("-inf"))))
        top_logprobs.append({state.token_text(tid): float(lp) for tid, lp in _top(entry, k)})
    out = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
    return out, offset


def chat_logprobs(
    state: ServerState, token_ids: list[int], entries: list[dict[int, float]] | None, k: int
) -> list[dict[str, Any]]:
    content = []
    for j, t in enumerate(token_ids):
        entry = entries[j] if entries is not None and j < len(entries) else None
        text = state.token_text(t)
        lp = float(entry.get(t, float("-inf"))) if entry else float("-inf")
        content.append(
            {
                "token": text,
                "logprob": max(lp, -9999.0),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": state.token_text(tid),
                        "logprob": max(float(v), -9999.0),
                        "bytes": list(state.token_text(tid).encode("utf-8")),
                    }
                    for tid, v in _top(entry, k)
                ],
            }
        )
    return content


def merge_logprobs(acc: dict[str, list] | None, more: dict[str, list]) -> dict[str, list]:
    if acc is None:
        return more
    for key in acc:
        acc[key].extend(more[key])
    return acc


def json_safe(obj: Any) -> Any:
    """JSON has no infinities: -inf log-probabilities become -9999.0 (as OpenAI's floor)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else -9999.0
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
