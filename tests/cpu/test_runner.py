"""`CpuRunner` in the engine: greedy steps finished without torch, every other request through the
engine's torch sampler over the same model and cache, and a KV cache that costs memory only as it
fills.

Oracles: the torch `Sampler` itself (the greedy fast path must pick exactly its tokens), the
process's own accounting (`sys.modules`, `/proc/self/status`), and the engine's contracts
(seeded sampling repeats, min_tokens holds back the stop tokens, non-finite logits fail the row).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf_files import write_llama_gguf

from nucleus.cpu.model import CpuModel
from nucleus.cpu.runner import CpuRunner
from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.engine.sequence import Sequence
from nucleus.loaders import load_model_files
from nucleus.loaders.gguf_file import open_gguf
from nucleus.sampling_params import SamplingParams

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def files():
    return load_model_files(None)


@pytest.fixture(scope="module")
def engine(files):
    model = files.build_cpu_model()
    return LLMEngine(model, files.tokenizer, EngineConfig(max_num_seqs=8, max_model_len=512))


def generate(engine, prompts, params):
    return [o.outputs[0] for o in engine.generate(prompts, params)]


PROMPTS = [[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
           [504, 3458, 282, 4649, 314], [28, 339, 1, 504]]  # fmt: skip


def test_greedy_steps_pick_the_torch_samplers_tokens(engine):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    fast = generate(engine, PROMPTS, plain)
    full = generate(engine, PROMPTS, with_logprobs)
    assert engine.runner._full_runner is not None  # the logprobs went through the torch sampler
    for a, b in zip(fast, full, strict=True):
        assert a.token_ids == b.token_ids
        assert len(b.logprobs) == 12 and all(len(lp) >= 2 for lp in b.logprobs)


def test_sampled_requests_repeat_with_their_seed(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=4, ignore_eos=True)
    first = generate(engine, PROMPTS[:2], params)
    again = generate(engine, PROMPTS[:2], params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]


def test_min_tokens_holds_the_stop_tokens_back(engine, files):
    stop = sorted(files.tokenizer.stop_tokens)
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, stop_token_ids=stop)
    (out,) = generate(engine, [PROMPTS[0]], params)
    assert len(out.token_ids) == 8 and not set(out.token_ids) & set(stop)


def test_non_finite_logits_fail_their_row_only(engine, monkeypatch):
    real = engine.runner.model.logits

    def poisoned(hidden):
        logits = real(hidden)
        logits[0, 5] = np.nan
        return logits

    monkeypatch.setattr(engine.runner.model, "logits", poisoned)
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.outputs[0].finish_reason == "error"
    assert "not finite" in out.outputs[0].error
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_generation_never_imports_torch():
    code = (
        "import sys\n"
        "from nucleus.loaders import load_model_files\n"
        "from nucleus.engine.engine import EngineConfig, LLMEngine\n"
        "from nucleus.sampling_params import SamplingParams\n"
        "files = load_model_files(None)\n"
        "engine = LLMEngine(files.build_cpu_model(), files.tokenizer, EngineConfig(max_num_seqs=1))\n"
        "out = engine.generate(['The capital of France is'], SamplingParams(temperature=0))\n"
        "assert out[0].outputs[0].text, out\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def resident_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_kv_cache_takes_memory_as_it_fills(tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, types={"token_embd.weight": "Q8_0"})
    model = CpuModel(open_gguf(path))
    before = resident_kb()
    runner = CpuRunner(model, num_kv_blocks=1 << 16)  # K, V x 2 layers x 2^16 x 16 x 128 x 2 bytes
    assert runner.k_cache.nbytes + runner.v_cache.nbytes == 1 << 30
    seq = Sequence("s", [3, 4, 5, 6], SamplingParams(temperature=0))
    seq.block_table = [40000]
    runner.forward([seq], [0], [4])
    assert runner.k_cache[:, 40000, :4].any()
    assert resident_kb() - before < 32 * 1024  # pages of a few tokens, not the gigabyte


def test_a_cache_dtype_other_than_float16_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path)
    with pytest.raises(ValueError, match="float16 KV cache"):
        LLMEngine(CpuModel(open_gguf(path)), None, EngineConfig(kv_dtype="float32"))
