"""A FAKE engine, for fast unit tests of the server's protocol and error mapping ONLY.

It has `AsyncLLM`'s face (generate, abort, encode_chat, tokenizer, max_model_len, model_name,
stats) and no model: a byte-level tokenizer and a canned text. The tests that check the server
end to end run a real `nucleus` server process with the real engine and the default model
(tests/server/test_server_*.py); nothing here stands in for them.
"""

from __future__ import annotations

import asyncio
import math

from nucleus.outputs import CompletionOutput, RequestOutput
from nucleus.sampling_params import SamplingParams

CANNED = "The quick brown fox jumps over the lazy dog. "


class FakeTokenizer:
    """Bytes are tokens 0-255; 256 is BOS, 257 is EOS; the rest decode as `<id>`."""

    bos_id = 256
    eos_id = 257
    pad_id = -1
    n_words = 50000
    stop_tokens = frozenset({257})

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        ids = list(s.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_prompt(self, s: str) -> list[int]:
        return self.encode(s, bos=True, eos=False)

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for t in ids:
            if t < 256:
                run.append(t)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if t >= 258:
                out.append(f"<{t}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class FakeAsyncLLM:
    """FAKE (unit tests only): generates `CANNED` byte by byte, `delay` seconds a token."""

    def __init__(self, max_model_len: int = 256, delay: float = 0.0) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.model_name = "fake-model"
        self.delay = delay
        self.active: dict[str, int] = {}  # request id -> fake KV blocks held
        self.aborted: list[str] = []
        self.submitted: list[tuple[list[int], SamplingParams]] = []

    chat_format = None  # not a Llama 3 format

    def encode_chat(self, messages: list[dict], tools: list | None = None) -> list[int]:
        ids = [self.tokenizer.bos_id]
        for m in messages:
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"unknown role {m['role']!r}")
            ids += self.tokenizer.encode(f"<{m['role']}>{m['content']}", bos=False, eos=False)
        return [*ids, *self.tokenizer.encode("<assistant>", bos=False, eos=False)]

    def stats(self) -> dict:
        return {
            "running": len(self.active),
            "waiting": 0,
            "kv_cache_usage": sum(self.active.values()) / 1000,
        }

    def abort(self, request_id: str) -> None:
        self.active.pop(request_id, None)
        self.aborted.append(request_id)

    @staticmethod
    def _entry(token: int, k: int) -> dict[int, float]:
        entry = {token: math.log(0.5)}
        for j in range(k):
            alt = (token + j + 1) % 256
            entry.setdefault(alt, math.log(0.5 / (k + 1)))
        return entry

    async def generate(self, prompt, params: SamplingParams, request_id: str):
        ids = (
            self.tokenizer.encode(prompt, bos=True, eos=False)
            if isinstance(prompt, str)
            else prompt
        )
        self.submitted.append((list(ids), params))
        self.active[request_id] = 1 + len(ids) // 16
        budget = params.max_tokens or (self.max_model_len - len(ids))
        outs = [CompletionOutput(index=j) for j in range(params.n)]
        canned = list(CANNED.encode())
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [self._entry(t, params.prompt_logprobs) for t in ids[1:]]
        try:
            step = 0
            while not all(o.finished for o in outs):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if request_id not in self.active:
                    for o in outs:
                        o.finish_reason = o.finish_reason or "abort"
                    break
                for j, o in enumerate(outs):
                    if o.finished:
                        continue
                    token = canned[(step + j) % len(canned)]
                    if params.logit_bias:
                        best = max(params.logit_bias.items(), key=lambda kv: kv[1])
                        if best[1] >= 50:
                            token = best[0]
                    o.token_ids.append(token)
                    if params.logprobs is not None:
                        o.logprobs = (o.logprobs or []) + [self._entry(token, params.logprobs)]
                    o.text = self.tokenizer.decode(o.token_ids)
                    for s in params.stop_strings:
                        if s in o.text:
                            o.text = o.text[: o.text.index(s)]
                            o.finish_reason, o.stop_reason = "stop", s
                    if not o.finished and len(o.token_ids) >= budget:
                        o.finish_reason = "length"
                self.active[request_id] += 1
                step += 1
                done = all(o.finished for o in outs)
                yield RequestOutput(
                    request_id=request_id,
                    prompt=None,
                    prompt_token_ids=list(ids),
                    outputs=[
                        CompletionOutput(
                            index=o.index,
                            text=o.text,
                            token_ids=list(o.token_ids),
                            logprobs=list(o.logprobs) if o.logprobs is not None else None,
                            finish_reason=o.finish_reason,
                            stop_reason=o.stop_reason,
                        )
                        for o in outs
                    ],
                    finished=done,
                    prompt_logprobs=prompt_lps,
                )
        finally:
            self.active.pop(request_id, None)
