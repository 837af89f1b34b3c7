"""What drives an `LLMEngine` for `AsyncLLM`, wherever the engine runs (a thread of the server's
process, or a process of its own: `nucleus.engine_process`): apply a batch of commands, run a
step with the failure policy, drain at shutdown, and the counters `stats()` reports.

Commands: `("add", (request_id, prompt, params, prompt_token_ids or None))` and
`("abort", request_id)`. The failure policy is `AsyncLLM`'s (its module docstring): a request the
engine refuses ends alone, a step that raises fails the requests it was running (all of them if
nothing was running), and the loss of the tensor-parallel group (`TensorParallelError`) is fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from nucleus.distributed import TensorParallelError
from nucleus.engine.engine import LLMEngine
from nucleus.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nucleus.sampling_params import SamplingParams

__all__ = ["Command", "EngineDriver", "error_output"]

logger = logging.getLogger("nucleus.async_llm")

Command = tuple[str, Any]


def error_output(
    request_id: str, prompt: str | list[int], params: SamplingParams, message: str
) -> RequestOutput:
    """A final output for a request that failed before (or without) producing tokens."""
    text = prompt if isinstance(prompt, str) else None
    ids = [] if isinstance(prompt, str) else list(prompt)
    return RequestOutput(
        request_id=request_id,
        prompt=text,
        prompt_token_ids=ids,
        outputs=[
            CompletionOutput(index=i, finish_reason="error", error=message) for i in range(params.n)
        ],
        finished=True,
        metrics=RequestMetrics(arrival_time=0.0),
    )


class EngineDriver:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.num_step_errors = 0

    def apply(self, commands: Iterable[Command]) -> tuple[list[RequestOutput], list[int]]:
        """Apply commands in order; returns the final outputs of the adds the engine refused and
        the sequences (`n`) of each add, refused or queued."""
        refused: list[RequestOutput] = []
        added: list[int] = []
        for kind, arg in commands:
            if kind == "add":
                request_id, prompt, params, ids = arg
                added.append(params.n)
                try:
                    self.engine.add_request(request_id, prompt, params, prompt_token_ids=ids)
                except Exception as e:  # refused: this request alone ends with the error
                    refused.append(error_output(request_id, prompt, params, str(e)))
            elif kind == "abort":
                self.engine.abort(arg)
        return refused, added

    def step(self) -> list[RequestOutput]:
        """One engine step; if it raises, the final outputs of the requests it failed."""
        try:
            return self.engine.step()
        except TensorParallelError:
            raise  # the model is gone: no step can run again
        except Exception as e:
            self.num_step_errors += 1
            logger.exception("engine step failed; failing the running requests")
            return self.engine.fail_unfinished(f"engine step failed: {e!r}")

    def drain(self) -> list[RequestOutput]:
        """At shutdown: abort every request; their final outputs (finish_reason "abort")."""
        engine = self.engine
        for rid in list(engine.requests):
            engine.abort(rid)
        outputs: list[RequestOutput] = []
        for _ in range(3):
            if not engine.has_unfinished():
                break
            try:
                outputs += engine.step()
            except Exception:
                outputs += engine.fail_unfinished("engine shut down", waiting_too=True)
        return outputs

    def stats(self) -> dict[str, Any]:
        """The engine's counters, with requests (not sequences) running and waiting. Read from
        another thread it is a rough snapshot: the engine is not stopped for it."""
        engine = self.engine
        s = engine.stats()
        running = {seq.request_id for seq in list(engine.scheduler.running)}
        waiting = {seq.request_id for seq in list(engine.scheduler.waiting)} - running
        return {
            "running": len(running),
            "waiting": len(waiting),
            "waiting_sequences": len(engine.scheduler.waiting),
            "kv_cache_usage": s["kv_cache_usage"],
            "num_preemptions": s["num_preemptions"],
            "prefix_cache_queries": s["prefix_cache_queries"],
            "prefix_cache_hits": s["prefix_cache_hits"],
            "generation_tokens": s["generation_tokens"],
            "prompt_tokens": s["prompt_tokens"],
            "step_errors": self.num_step_errors,
        }
