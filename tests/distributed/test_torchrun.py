"""`Llama.build(model_parallel_size=2)` under `torchrun --nproc_per_node 2`, as Meta's runs, on the
CPU (gloo), on Meta checkpoints this test writes.

Oracle: `Llama.build` with one rank on the same checkpoint (itself checked against
`transformers` in test_generation.py), fp32: the same tokens, greedy and sampled with the same
seed (every rank samples for itself, as in the reference), logprobs within 1e-5. Cases: a
checkpoint of 2 shards read one file per rank, with 8 KV heads; a checkpoint of 1 shard re-sharded,
with 1 KV head for 2 ranks; and a shard that only rank 1 reads, broken: every rank must raise
(rank 0 naming rank 1), and the group must exit rather than hang.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import GQA8, KV1, random_meta_weights, write_meta_checkpoint

from nucleus import Llama
from nucleus.assets import asset_path

PROMPTS = [[128000, 791, 1917, 315, 9822, 374], [128000, 40, 1093, 1000, 2000]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    gqa8 = write_meta_checkpoint(root / "gqa8", GQA8, random_meta_weights(GQA8, seed=21), shards=2)
    kv1 = write_meta_checkpoint(root / "kv1", KV1, random_meta_weights(KV1, seed=22), shards=1)
    broken = write_meta_checkpoint(root / "broken", KV1, random_meta_weights(KV1, seed=23), 2)
    shard = torch.load(broken / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-1]
    torch.save(shard, broken / "consolidated.01.pth")
    return {"gqa8": gqa8, "kv1": kv1, "broken": broken}


CASES = [("gqa8", 0.0), ("kv1", 0.0), ("gqa8", 0.8), ("broken", 0.0)]


@pytest.fixture(scope="module")
def torchrun_results(checkpoints):
    tokenizer = str(asset_path("llama3-tokenizer"))
    spec = {
        "tokenizer": tokenizer,
        "prompts": PROMPTS,
        "cases": [{"ckpt": str(checkpoints[c]), "temperature": t} for c, t in CASES],
    }
    script = Path(__file__).with_name("llama_ranks.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), json.dumps(spec)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(CASES), run.stdout + run.stderr
    return lines


def one_rank(ckpt: Path, temperature: float) -> dict:
    llama = Llama.build(str(ckpt), str(asset_path("llama3-tokenizer")), 64, 2, device="cpu")
    tokens, logprobs = llama.generate(PROMPTS, 12, temperature=temperature, logprobs=True)
    return {"tokens": tokens, "logprobs": logprobs}


@pytest.mark.parametrize(
    "case", range(3), ids=["2-shards-8-kv-heads", "resharded-1-kv-head", "sampled"]
)
def test_two_ranks_generate_what_one_does(checkpoints, torchrun_results, case):
    name, temperature = CASES[case]
    got, expected = torchrun_results[case], one_rank(checkpoints[name], temperature)
    assert got["tokens"] == expected["tokens"]
    for row, want in zip(got["logprobs"], expected["logprobs"], strict=True):
        assert row == pytest.approx(want, abs=1e-5)


def test_a_rank_that_cannot_load_fails_every_rank(torchrun_results):
    error = torchrun_results[3]["error"]
    assert error.startswith("TensorParallelError: loading the model failed on rank(s) [1]")
    assert "consolidated.01.pth: tensor 'layers.1.feed_forward.w2.weight' has shape" in error
