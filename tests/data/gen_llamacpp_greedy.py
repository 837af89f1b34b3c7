"""Regenerate `smollm2_llamacpp_greedy.json`: llama.cpp's greedy answers to chat prompts.

`tests/cpu/test_llamacpp_agreement.py` compares nucleus's CPU path (8-bit activations, as
llama.cpp computes) with llama.cpp's own greedy tokens on the default model. Run this script in
the project's environment; it encodes the chat prompts with nucleus's chat template and has
llama.cpp (llama-cpp-python, in a virtual environment of its own: /work/shared/peers.md says how to
build it for this CPU) continue each, greedily, up to its end-of-turn token or 48 tokens:

    python tests/data/gen_llamacpp_greedy.py /work/venvs/llamacpp/bin/python

llama.cpp runs with 1 thread (its results do not depend on it) on the prompt's token ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "smollm2_llamacpp_greedy.json"
MAX_TOKENS = 48

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Give me three tips for learning a new language.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
    "Name a planet in our solar system.",
    "How do I make a cup of tea?",
    "What does a CPU do?",
    "Tell me a fun fact about octopuses.",
    "Summarize the plot of Cinderella in two sentences.",
    "What is the difference between weather and climate?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
    "List the primary colors.",
    "What is a prime number?",
    "Write one sentence about autumn.",
    "How many days are in a leap year?",
]

_LLAMACPP = """
import json, sys
import numpy as np
from llama_cpp import Llama
model, max_tokens, eos = sys.argv[1], int(sys.argv[2]), set(json.loads(sys.argv[3]))
llm = Llama(model, n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
answers = []
for ids in json.loads(sys.stdin.read()):
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < max_tokens:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        out.append(token)
        if token in eos:
            break
        llm.eval([token])
    answers.append(out)
print(json.dumps(answers))
"""


def main() -> int:
    sys.path.insert(0, str(HERE.parents[1]))
    from nucleus.assets import asset_path
    from nucleus.loaders import DEFAULT_MODEL_ASSET, load_model_files

    model = str(asset_path(DEFAULT_MODEL_ASSET))
    files = load_model_files(model)
    prompts = [
        list(files.chat.encode_dialog_prompt([{"role": "user", "content": q}])) for q in QUESTIONS
    ]
    eos = sorted(files.tokenizer.stop_tokens)
    out = subprocess.run(
        [sys.argv[1], "-c", _LLAMACPP, model, str(MAX_TOKENS), json.dumps(eos)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        check=True,
    )
    answers = json.loads(out.stdout)
    records = [
        {"question": q, "prompt_ids": p, "llamacpp_ids": a}
        for q, p, a in zip(QUESTIONS, prompts, answers, strict=True)
    ]
    OUT.write_text(json.dumps({"max_tokens": MAX_TOKENS, "records": records}, indent=1) + "\n")
    print(f"wrote {OUT} ({len(records)} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
