"""One rank of `test_torchrun.py`'s group, run under `torchrun --nproc_per_node 2`.

For each case of the JSON spec in argv[1], every rank builds `Llama` with `model_parallel_size=2`
and generates; rank 0 prints one JSON line per case (the other ranks' stdout is /dev/null, as in
Meta's `Llama.build`): the tokens and logprobs, or the error it raised.
"""

from __future__ import annotations

import json
import sys

from nucleus import Llama


def main() -> None:
    spec = json.loads(sys.argv[1])
    for case in spec["cases"]:
        try:
            llama = Llama.build(
                case["ckpt"],
                spec["tokenizer"],
                max_seq_len=64,
                max_batch_size=len(spec["prompts"]),
                model_parallel_size=2,
                device="cpu",
            )
            tokens, logprobs = llama.generate(
                spec["prompts"], max_gen_len=12, temperature=case["temperature"], logprobs=True
            )
            result = {"tokens": tokens, "logprobs": logprobs}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
