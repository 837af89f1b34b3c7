"""`nucleus serve --tensor-parallel-size 2`: one command starts the server, its engine process and
the engine's worker process.

Oracle: `LLM` with one rank on the same fp32 checkpoint: the server's greedy completion (through
the official `openai` client) has the same text. The server then shuts down cleanly (exit 0),
its engine process and worker with it.
"""

from __future__ import annotations

from pathlib import Path

from checkpoints import KV1, random_meta_weights, write_meta_checkpoint
from server_helpers import start_server

from nucleus.assets import asset_path
from nucleus.llm import LLM
from nucleus.sampling_params import SamplingParams

PROMPT = "The capital of France is"


def test_a_two_rank_server_answers_as_one_rank(tmp_path):
    import openai

    ckpt = write_meta_checkpoint(tmp_path, KV1, random_meta_weights(KV1, seed=31), shards=2)
    tokenizer = str(asset_path("llama3-tokenizer"))
    args = {"device": "cpu", "dtype": "float32", "max_model_len": 64, "num_kv_blocks": 32}
    expected = LLM(str(ckpt), tokenizer=tokenizer, **args).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    server = start_server(
        *("--model", str(ckpt), "--tokenizer", tokenizer, "--device", "cpu"),
        *("--dtype", "float32", "--max-model-len", "64", "--tensor-parallel-size", "2"),
    )
    try:
        with openai.OpenAI(
            api_key=server.api_key, base_url=f"{server.base_url}/v1", max_retries=0, timeout=120
        ) as client:
            answer = client.completions.create(
                model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
        assert answer.choices[0].text == expected.outputs[0].text
        spawned = spawned_descendants(server.proc.pid)
        assert len(spawned) == 2  # the engine process and the rank-1 worker it started
    finally:
        assert server.stop() == 0, server.log()[-4000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in spawned)


def spawned_descendants(pid: int) -> list[int]:
    """The processes `pid` started with multiprocessing's `spawn`, and theirs (Linux's /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found += [child, *spawned_descendants(child)]
    return found
