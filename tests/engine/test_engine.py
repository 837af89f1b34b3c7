"""The engine end to end on a tiny random model (CPU): paged cache, prefix hits, chunked prefill
and preemption all give the tokens of a plain recompute-everything greedy loop."""

from __future__ import annotations

import pytest
import torch
from steps import cpu_backend, step_logits
from toy import ToyTokenizer, tiny_model

from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.model import Transformer
from nucleus.sampling_params import SamplingParams

V = 64


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(vocab_size=V, dim=32, ffn=64, max_len=64, std=0.3, seed=0)


def naive_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    return step_logits(model, cpu_backend(model.config, 1, 64), [(ids, 0, [0])])[-1]


_greedy_cache: dict[tuple[int, ...], list[int]] = {}


def naive_greedy(model, prompt, n) -> list[int]:
    key = (id(model), *prompt, -1, n)
    if key in _greedy_cache:
        return _greedy_cache[key]
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(naive_logits(model, ids).argmax()))
    return ids[len(prompt) :]


def engine(model, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("block_size", 4)
    return LLMEngine(model, ToyTokenizer(V), EngineConfig(**kw))


PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13],
    [5, 6, 7, 8, 9, 10, 11, 12, 20, 21],
    [30, 31],
    [40] * 17,
]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_num_batched_tokens": 5},  # chunked prefill
        {
            "num_kv_blocks": 9,
            "max_num_batched_tokens": 7,
            "max_model_len": 32,
        },  # preemption by recompute
        {"enable_prefix_caching": False, "max_num_seqs": 2},
    ],
)
def test_greedy_matches_a_plain_recompute_loop(model, kw):
    e = engine(model, **kw)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = e.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == naive_greedy(model, prompt, 8)
        assert out.outputs[0].finish_reason == "length"
    assert e.block_manager.num_used_blocks == 0 and not e.has_unfinished()
    if not kw:  # now cached: the shared 8-token prefix is reused
        (out,) = e.generate([PROMPTS[1]], params)
        assert out.outputs[0].token_ids == naive_greedy(model, PROMPTS[1], 8)
        assert out.num_cached_tokens == 8 and e.block_manager.num_hit_blocks >= 2
    if "num_kv_blocks" in kw:
        assert e.scheduler.num_preemptions > 0


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_every_attention_backend_gives_the_tokens_of_the_plain_loop(model, backend):
    """Steps that mix decodes with prefill chunks, then decode-only steps (through the runner's
    static decode buffers where the backend has them). Triton runs interpreted without a GPU."""
    from nucleus.kernels import cpu as cpu_kernels
    from nucleus.kernels.triton import triton_usable

    if backend == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    if backend == "triton" and not triton_usable("cpu"):
        pytest.skip("Triton is not installed")
    fresh = tiny_model(vocab_size=V, dim=32, ffn=64, max_len=64, std=0.3, seed=0)  # same weights
    if backend == "triton":
        from nucleus.ops.triton_ops import TritonOps

        fresh.bind_kernels(ops=TritonOps(max_positions=64))
    e = engine(fresh, attention_backend=backend, max_num_batched_tokens=12)
    assert e.runner.attention.name == backend
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt, out in zip(PROMPTS, e.generate(PROMPTS, params), strict=True):
        assert out.outputs[0].token_ids == naive_greedy(model, prompt, 8)
    assert e.block_manager.num_used_blocks == 0


def penalized_greedy(model, prompt, n, rep, freq, pres) -> list[int]:
    """The plain loop with the penalties applied by hand to each step's logits (vLLM's
    repetition penalty over prompt and output; OpenAI's frequency and presence over output)."""
    ids = list(prompt)
    for _ in range(n):
        x = naive_logits(model, ids).clone()
        out = ids[len(prompt) :]
        for t in set(ids):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        for t in set(out):
            x[t] -= freq * out.count(t) + pres
        ids.append(int(x.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_penalty_counts_kept_on_the_device_give_the_plain_loop(model, backend):
    rep, freq, pres = 1.3, 0.4, 0.25
    params = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True,
        repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
    )  # fmt: skip
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    e = triton_engine() if backend == "triton" else engine(model)
    outs = e.generate(PROMPTS, [params, plain, params, plain])
    for i in (0, 2):
        expected = penalized_greedy(model, PROMPTS[i], 10, rep, freq, pres)
        assert outs[i].outputs[0].token_ids == expected
    assert outs[1].outputs[0].token_ids == naive_greedy(model, PROMPTS[1], 10)
    assert not e.runner.penalties.rows  # released with their requests


def triton_engine(**kw) -> LLMEngine:
    """The engine on the Triton backend and ops (interpreted without a GPU): decode steps run on
    the runner's static buffers, which async scheduling needs."""
    from nucleus.kernels.triton import triton_usable
    from nucleus.ops.triton_ops import TritonOps

    if not triton_usable("cpu"):
        pytest.skip("Triton is not installed")
    fresh = tiny_model(vocab_size=V, dim=32, ffn=64, max_len=64, std=0.3, seed=0)
    fresh.bind_kernels(ops=TritonOps(max_positions=64))
    return engine(fresh, attention_backend="triton", **kw)


def test_async_scheduling_gives_the_outputs_of_the_synchronous_loop(monkeypatch):
    """Steps launched ahead (their tokens read on the device) end as the synchronous loop does:
    by stop token, stop string, length, and abort, with seeded sampling and n > 1."""
    requests = [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[29])),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["C"])),
        (PROMPTS[2], SamplingParams(temperature=1.0, seed=7, max_tokens=10, n=2, logprobs=1)),
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
        (PROMPTS[0][:4], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)),
        (
            PROMPTS[1],
            SamplingParams(temperature=0, max_tokens=9, min_tokens=4, frequency_penalty=1.0),
        ),
    ]
    runs = {}
    for overlap in (False, True):
        e = triton_engine(async_scheduling=overlap)
        ahead = []
        launch = e.runner.launch
        monkeypatch.setattr(
            e.runner,
            "launch",
            lambda b, after=None, masks=None, ahead=ahead, launch=launch: (
                ahead.append(after) or launch(b, after, masks)
            ),
        )
        for i, (prompt, params) in enumerate(requests):
            e.add_request(f"r{i}", prompt, params)
        finals, steps = {}, 0
        while e.has_unfinished():
            steps += 1
            if steps == 4:
                e.abort("r4")
            finals.update({o.request_id: o for o in e.step() if o.finished})
        runs[overlap] = [
            [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in finals[f"r{i}"].outputs]
            for i in range(len(requests))
        ]
        assert (sum(a is not None for a in ahead) > 0) == overlap
        while e._ahead is not None:  # a step launched for sequences that then ended
            e.step()
        assert e.block_manager.num_used_blocks == 0
    assert runs[True] == runs[False]
    assert runs[True][0][0][2] == "stop" and runs[True][4][0][2] == "abort"


def test_seeded_request_alone_or_in_a_batch(model):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=10, ignore_eos=True)
    alone = engine(model).generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    mixed = (
        engine(model)
        .generate(
            [PROMPTS[2], PROMPTS[0], PROMPTS[3]],
            [
                SamplingParams(temperature=1.0, max_tokens=5),
                p,
                SamplingParams(seed=3, max_tokens=7),
            ],
        )[1]
        .outputs[0]
        .token_ids
    )
    assert alone == mixed


def test_logprobs_stop_strings_and_n(model):
    e = engine(model)
    greedy = naive_greedy(model, PROMPTS[0], 6)
    text = ToyTokenizer(V).decode(greedy)
    params = SamplingParams(
        temperature=0,
        max_tokens=6,
        ignore_eos=True,
        logprobs=2,
        prompt_logprobs=1,
        stop=[text[3:5]],
        n=2,
    )
    out = e.generate([PROMPTS[0]], params)[0]
    for c in out.outputs:
        assert c.text == text[: text.find(text[3:5])] and c.finish_reason == "stop"
        assert c.stop_reason == text[3:5]
        lp = torch.log_softmax(naive_logits(model, PROMPTS[0]), -1)
        assert c.logprobs[0][greedy[0]] == pytest.approx(lp[greedy[0]].item(), abs=1e-4)
        assert len(c.logprobs[0]) == 2  # the chosen token is the top one
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPTS[0])
    lp = torch.log_softmax(naive_logits(model, PROMPTS[0][:3]), -1)
    assert out.prompt_logprobs[3][PROMPTS[0][3]] == pytest.approx(
        lp[PROMPTS[0][3]].item(), abs=1e-4
    )


def test_nan_logits_end_only_that_request_with_error(model, monkeypatch):
    e = engine(model)
    compute = model.compute_logits

    def poisoned(hidden):
        logits = compute(hidden)
        if logits.shape[0] == 2:
            logits[0, 3] = float("nan")
        return logits

    monkeypatch.setattr(e.runner.model, "compute_logits", poisoned)
    outs = e.generate(
        [PROMPTS[0], PROMPTS[2]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    )
    assert outs[0].outputs[0].finish_reason == "error" and outs[0].outputs[0].error
    assert outs[1].outputs[0].finish_reason == "length"
    assert e.block_manager.num_used_blocks == 0


def test_abort_returns_blocks_and_reports_abort(model):
    e = engine(model)
    e.add_request("a", PROMPTS[3], SamplingParams(max_tokens=20, ignore_eos=True))
    e.step()
    e.abort("a")
    (out,) = e.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert e.block_manager.num_used_blocks == 0 and not e.has_unfinished()


def test_stream_interval_reports_fewer_larger_outputs_with_the_same_tokens(model):
    """`stream_interval=4`: a stream hears at its first token, then every 4th step, then at its
    end; the tokens are the plain loop's (the oracle) and an abort is still reported at once."""
    e = engine(model, stream_interval=4)
    e.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    outs = []
    while e.has_unfinished():
        outs += e.step()
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 5, 9, 10]
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == naive_greedy(
        model, PROMPTS[0], 10
    )
    e.add_request("b", PROMPTS[3], SamplingParams(max_tokens=20, ignore_eos=True))
    e.step()
    e.step()
    e.abort("b")
    (out,) = e.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)


def test_the_start_up_warm_up_runs_every_eager_step_shape_and_leaves_the_pool_alone():
    """On a GPU the runner runs each eagerly compiled step shape once at start-up (so no Triton
    kernel compiles under the first requests); here, interpreted, the same steps must run, and
    afterwards the engine's outputs are those of a fresh engine and every block is free."""
    e = triton_engine()
    backend = e.runner.attention
    batches = backend.eager_decode_batches(256)
    assert {backend.splits_for(b) for b in range(1, 257)} == {
        backend.splits_for(b) for b in batches
    }
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in triton_engine().generate(PROMPTS, greedy)]
    free = e.scheduler.block_manager.num_free_blocks
    e.runner._warm_up(max_num_seqs=8, max_model_len=64)
    assert e.scheduler.block_manager.num_free_blocks == free
    assert [o.outputs[0].token_ids for o in e.generate(PROMPTS, greedy)] == expected
