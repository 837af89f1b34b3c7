"""The engine on CUDA (Triton backend, CUDA graphs) against the CPU and the torch backend.

Run on a GPU machine (CI has none: skipped there). Oracles: the CPU engine in float32 (its C
kernels and backend are checked against transformers), greedy tokens exactly; in bf16, the torch
ops and torch SDPA backend on the same weights, logits within 1e-2 relative, and the same engine
with graphs off (`enforce_eager`), greedy tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

from nucleus.config import ModelConfig
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.loaders import build_transformer
from nucleus.ops import TorchOps
from nucleus.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = {
    "dim": 512,
    "n_layers": 4,
    "n_heads": 8,
    "n_kv_heads": 2,
    "vocab_size": 128256,
    "multiple_of": 256,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
}


class Ids:
    """A tokenizer stand-in: the tests feed token ids; text is the ids."""

    stop_tokens = frozenset({128001, 128009})

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {}

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    from gpu import random_weights

    return random_weights(SMALL, dtype, "cpu", seed=0)


def engine(device: str, dtype: torch.dtype, w, **options) -> LLMEngine:
    config = ModelConfig.from_meta_params(SMALL)
    model = build_transformer(config, w, device=device, dtype=dtype)
    options = {"max_num_seqs": 8, "max_model_len": 512, **options}
    return LLMEngine(model, Ids(), EngineConfig(**options))


PROMPTS = [list(range(1000 + i, 1000 + i + 5 + 23 * i)) for i in range(8)]


def greedy(e: LLMEngine, n: int = 32) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in e.generate(PROMPTS, params)]


def test_fp32_greedy_tokens_on_cuda_equal_the_cpu():
    w = weights(torch.float32)
    cuda = engine("cuda", torch.float32, w)
    assert cuda.runner.attention.name == "triton" and cuda.runner.decode_step.graphs
    assert greedy(cuda) == greedy(engine("cpu", torch.float32, w))


def test_bf16_greedy_tokens_with_graphs_equal_without():
    w = weights(torch.bfloat16)
    graphs = engine("cuda", torch.bfloat16, w)
    eager = engine("cuda", torch.bfloat16, w, enforce_eager=True)
    assert graphs.runner.decode_step.graphs and not eager.runner.decode_step.graphs
    assert greedy(graphs) == greedy(eager)


def test_bf16_logits_of_the_triton_path_are_within_1e_2_of_the_torch_path():
    """The same tokens through both paths (a logit bias forces each step's token, applied after
    the logits are taken), so the logits of every prefill and decode step can be compared."""
    w = weights(torch.bfloat16)
    fast = engine("cuda", torch.bfloat16, w)
    plain = engine("cuda", torch.bfloat16, w, attention_backend="torch")
    plain.model.bind_kernels(ops=TorchOps())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={777: 100.0})
    logits = {}
    for name, e in (("fast", fast), ("plain", plain)):
        captured = []
        compute = e.model.compute_logits

        def keep(hidden, compute=compute, captured=captured):
            out = compute(hidden)
            captured.append(out.clone())
            return out

        e.model.compute_logits = keep  # the decode graphs were captured with the real one
        if e.runner.decode_step is not None:
            e.runner.decode_step.graphs.clear()
        outs = e.generate(PROMPTS, params)
        assert all(o.outputs[0].token_ids == [777] * 12 for o in outs)
        logits[name] = torch.cat([c[: len(PROMPTS)] for c in captured])
    a, b = logits["fast"].double(), logits["plain"].double()
    assert a.shape == b.shape == (12 * len(PROMPTS), SMALL["vocab_size"])
    assert ((a - b).norm() / b.norm()).item() <= 1e-2


def others(n: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """`n` requests of mixed lengths (some sharing a prefix with TARGET) and output lengths."""
    import random

    rng = random.Random(seed)
    prompts = [
        (SHARED[: rng.randint(0, len(SHARED))] if i % 3 == 0 else [])
        + [rng.randrange(2, 128000) for _ in range(rng.randint(1, 300))]
        for i in range(n)
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True)
        for _ in prompts
    ]
    return prompts, params


SHARED = list(range(3000, 3040))
TARGET = [*SHARED, 7, 8, 9, 10, 11]
TARGET_PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 97},  # chunked prefills beside decodes
        {"num_kv_blocks": 120, "max_model_len": 512},  # preemption by recompute
    ],
    ids=["prefix-cache", "no-prefix-cache", "chunked", "tiny-pool"],
)
def test_fp32_greedy_alone_equals_among_256_others(kw):
    """Issue 15's invariance on the GPU path (Triton kernels, graphs, async scheduling)."""
    w = weights(torch.float32)
    alone = engine("cuda", torch.float32, w).generate([TARGET], TARGET_PARAMS)[0]
    prompts, params = others(256)
    prompts.insert(128, TARGET)
    params.insert(128, TARGET_PARAMS)
    e = engine("cuda", torch.float32, w, **{"max_num_seqs": 256, **kw})
    outs = e.generate(prompts, params)
    assert outs[128].outputs[0].token_ids == alone.outputs[0].token_ids
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    if "num_kv_blocks" in kw:
        assert e.scheduler.num_preemptions > 0
    for j in (0, 77, 200):  # a few others, alone
        (single,) = engine("cuda", torch.float32, w).generate([prompts[j]], params[j])
        assert single.outputs[0].token_ids == outs[j].outputs[0].token_ids
    assert e.block_manager.num_used_blocks == 0
