"""`LLM(tensor_parallel_size=2)` on the CPU: two processes over gloo, started by the `LLM` itself.

Oracle: the same `LLM` with one rank (itself checked against `transformers` in test_llm.py and
the loader tests) on the same fp32 checkpoint. Greedy tokens must be identical; logprobs of the
sampled and the prompt tokens agree to 1e-5 (the row-parallel sums add the same products in
another order). Failures: a worker that dies or a rank that cannot load must end the group with
an error that names the rank, within seconds, and leave no process behind; so must a worker that
raises in a step.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
import torch
import triton_interpreter
from checkpoints import GQA8, KV1, random_meta_weights, write_meta_checkpoint

from nucleus.assets import asset_path
from nucleus.distributed import TensorParallelError
from nucleus.llm import LLM, _load_shard
from nucleus.sampling_params import SamplingParams
from nucleus.tokenizer import Tokenizer

PROMPTS = [[128000, 791, 1917, 315, 9822, 374], [128000, 40, 1093], list(range(1000, 1040))]
OPTIONS = {"device": "cpu", "dtype": "float32", "max_model_len": 96, "num_kv_blocks": 48}


def llm(ckpt, **kwargs) -> LLM:
    return LLM(
        str(ckpt), tokenizer=asset_path("llama3-tokenizer"), block_size=8, **OPTIONS, **kwargs
    )


@pytest.fixture(scope="module", params=[GQA8, KV1], ids=["8-kv-heads", "1-kv-head"])
def checkpoint(request, tmp_path_factory):
    shape = request.param
    path = tmp_path_factory.mktemp("tp")
    return write_meta_checkpoint(path, shape, random_meta_weights(shape, seed=11), shards=2)


def outputs(model: LLM, params: SamplingParams, prompts: list = PROMPTS) -> list:
    return model.generate(prompts, params)


def test_two_ranks_generate_what_one_does(checkpoint):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)  # fmt: skip
    one = llm(checkpoint)
    expected = outputs(one, greedy)
    two = llm(checkpoint, tensor_parallel_size=2)
    try:
        got = outputs(two, greedy)
        for a, b in zip(got, expected, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert la.keys() == lb.keys()
                assert all(abs(la[t] - lb[t]) <= 1e-5 for t in la)
            for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
                assert all(abs(la[t] - lb[t]) <= 1e-5 for t in lb)
        assert two.engine.runner.kv.k.shape[3] == max(one.model.config.n_kv_heads // 2, 1)
    finally:
        two.shutdown()
    assert not any(p.is_alive() for p in two.engine.runner.workers.processes)


def test_four_ranks_generate_what_one_does(tmp_path):
    """Wider groups than the checkpoint's 2 shards (re-sharded on load), 2 KV heads a rank: the
    same greedy tokens as one process (the CPU side of issue 17's check across TP sizes)."""
    ckpt = write_meta_checkpoint(tmp_path, GQA8, random_meta_weights(GQA8, seed=11), shards=2)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in outputs(llm(ckpt), greedy)]
    four = llm(ckpt, tensor_parallel_size=4)
    try:
        assert [o.outputs[0].token_ids for o in outputs(four, greedy)] == expected
        assert four.engine.runner.kv.k.shape[3] == GQA8.n_kv_heads // 4
    finally:
        four.shutdown()


def shard_for_triton_interpreter(ckpt: str, tp):
    """Rank `tp`'s shard, in a process where Triton's interpreter is set up as in this one."""
    triton_interpreter.set_up()
    return _load_shard(ckpt, str(asset_path("llama3-tokenizer")), torch.float32, tp)


def test_steps_launched_ahead_get_their_tokens_on_every_rank(tmp_path):
    """The Triton backend (interpreted on the CPU) decodes on static buffers, and the engine
    launches each decode step before the host has the tokens it reads: the workers receive them
    from rank 0 by a broadcast. Same greedy tokens as one rank on the same backend."""
    ckpt = write_meta_checkpoint(tmp_path, KV1, random_meta_weights(KV1, seed=14), shards=2)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = PROMPTS[:2]
    expected = outputs(llm(ckpt, attention_backend="triton"), greedy, prompts)
    two = LLM.from_builder(
        functools.partial(shard_for_triton_interpreter, str(ckpt)),
        Tokenizer(asset_path("llama3-tokenizer")),
        device="cpu", max_model_len=96, num_kv_blocks=48, block_size=8,
        attention_backend="triton", tensor_parallel_size=2,
    )  # fmt: skip
    try:
        assert two.engine.runner.can_feed_tokens_on_device
        got = outputs(two, greedy, prompts)
    finally:
        two.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


@pytest.fixture
def group(tmp_path):
    ckpt = write_meta_checkpoint(tmp_path, KV1, random_meta_weights(KV1, seed=12), shards=2)
    model = llm(ckpt, tensor_parallel_size=2)
    yield model, model.engine.runner.workers.processes[0]
    model.shutdown()


def test_a_worker_that_dies_between_steps_ends_the_group(group):
    model, worker = group
    os.kill(worker.pid, signal.SIGKILL)
    workers = model.engine.runner.workers
    deadline = time.monotonic() + 10
    while workers.failure is None and time.monotonic() < deadline:  # its monitor reaps the worker
        time.sleep(0.05)
    with pytest.raises(TensorParallelError, match=r"rank 1 died \(exit code -9\)"):
        model.generate(PROMPTS[0], SamplingParams(max_tokens=4))
    with pytest.raises(TensorParallelError, match="rank 1 died"):  # and stays ended
        model.generate(PROMPTS[0], SamplingParams(max_tokens=4))


def test_a_worker_that_dies_during_a_step_ends_the_group(group):
    model, worker = group
    long = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1 died"):
        model.generate(PROMPTS * 8, long)
    assert time.monotonic() - start < 30
    assert model.engine.block_manager.num_free_blocks == model.engine.block_manager.num_blocks


def shard_failing_at_decode(ckpt: str, tp):
    """Rank `tp`'s shard; rank 1's raises at its first decode step (a worker's error in a step)."""
    model = _load_shard(ckpt, str(asset_path("llama3-tokenizer")), torch.float32, tp)
    if tp.rank == 1:
        forward = model.layers[1].attention.forward

        def failing(x, *args):
            if x.shape[0] == 1:
                raise RuntimeError("injected failure")
            return forward(x, *args)

        model.layers[1].attention.forward = failing
    return model


def test_a_worker_that_fails_in_a_step_ends_the_group(tmp_path):
    ckpt = write_meta_checkpoint(tmp_path, KV1, random_meta_weights(KV1, seed=13), shards=2)
    build = functools.partial(shard_failing_at_decode, str(ckpt))
    model = LLM.from_builder(
        build, Tokenizer(asset_path("llama3-tokenizer")), device="cpu", tensor_parallel_size=2,
        max_model_len=96, num_kv_blocks=48, block_size=8,
    )  # fmt: skip
    try:
        with pytest.raises(TensorParallelError, match="rank 1 failed while running: Runtime"):
            model.generate(PROMPTS[1], SamplingParams(max_tokens=4))
    finally:
        model.shutdown()


def test_a_rank_that_cannot_load_ends_the_group(tmp_path):
    """Rank 1 reads its own shard only, and that shard is corrupt: the `LLM` raises naming it."""
    ckpt = write_meta_checkpoint(tmp_path, KV1, random_meta_weights(KV1, seed=3), shards=2)
    shard = torch.load(ckpt / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wo.weight"] = shard["layers.0.attention.wo.weight"][:, :-1]
    torch.save(shard, ckpt / "consolidated.01.pth")
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 failed to build its shard: .*wo"):
        llm(ckpt, tensor_parallel_size=2)
    assert time.monotonic() - start < 120
