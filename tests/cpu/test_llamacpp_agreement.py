"""The CPU path's greedy answers against llama.cpp's on the default model's chat prompts.

Oracle: llama.cpp's own greedy tokens (llama-cpp-python 0.3.36 built for this machine, 1
thread), recorded by tests/data/gen_llamacpp_greedy.py for 20 chat prompts, up to 48 tokens or
the end of the turn. The CPU path computes as llama.cpp does (8-bit activations per block, the
integer products, a float16 KV cache) but not in the same float32 summation order, so near-ties can
break the other way and the answers part from there. Recorded on 2026-11-29: 12 of the 20 answers
identical to llama.cpp's (the float32 model: 8), the others the same for their first tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nucleus.engine.engine import EngineConfig, LLMEngine
from nucleus.loaders import load_model_files
from nucleus.sampling_params import SamplingParams

DATA = Path(__file__).parents[1] / "data" / "smollm2_llamacpp_greedy.json"


@pytest.mark.slow
def test_most_greedy_answers_are_llamacpps():
    data = json.loads(DATA.read_text())
    files = load_model_files(None)
    engine = LLMEngine(
        files.build_cpu_model(), files.tokenizer, EngineConfig(max_num_seqs=20, max_model_len=1024)
    )
    params = SamplingParams(temperature=0, max_tokens=data["max_tokens"])
    outs = engine.generate([r["prompt_ids"] for r in data["records"]], params)
    identical = 0
    for record, out in zip(data["records"], outs, strict=True):
        identical += list(out.outputs[0].token_ids) == record["llamacpp_ids"]
    assert identical >= 11, f"{identical} of {len(outs)} answers are llama.cpp's"
