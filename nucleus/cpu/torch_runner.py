"""`CpuModelRunner`: the engine's `ModelRunner` sampling over a `CpuRunner`'s model and cache.

`ModelRunner` reads a step's hidden states from `_forward` and its logits from
`model.compute_logits`; here both come from the C model (as torch views of its numpy arrays), and
everything after the logits (penalties, temperature, top-k/p, min-p, seeded draws, logprobs,
prompt logprobs, bans) is `ModelRunner`'s own. `CpuRunner` hands it the steps it does not finish
itself.
"""

from __future__ import annotations

import torch

from nucleus.cpu.runner import CpuRunner
from nucleus.engine.runner import ModelRunner
from nucleus.sampling import Sampler


class _Logits:
    """What `ModelRunner` needs of its model: the config and `compute_logits`."""

    def __init__(self, cpu: CpuRunner) -> None:
        self.cpu = cpu
        self.config = cpu.config

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.cpu.model.logits(hidden.numpy()))


class CpuModelRunner(ModelRunner):
    def __init__(self, cpu: CpuRunner) -> None:  # the model and cache are the CpuRunner's
        self.cpu = cpu
        self.workers = None
        self.model = _Logits(cpu)
        self.config = cpu.config
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.block_size = cpu.block_size
        self.sampler = Sampler()
        self.penalties = None
        self.stop_token_ids = cpu.stop_token_ids
        self.decode_step = None  # every step is a flat batch

    def _forward(
        self,
        token_ids: list[int],
        starts: list[int],
        num_tokens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        return torch.from_numpy(self.cpu.hidden(token_ids, starts, num_tokens, block_tables))
