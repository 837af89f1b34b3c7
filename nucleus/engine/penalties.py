"""Token counts for repetition, frequency and presence penalties, kept on the device.

A sequence with a penalty gets a row in two pooled tensors the first time it samples: how often
each token occurs in its output, and which tokens occur in its prompt (one host-to-device copy,
from its token ids). After each step the sampled tokens are added to their rows on the device, so
no step rebuilds the counts from Python lists and none waits for the host: a decode step launched
ahead (`LLMEngine.step`) reads counts that already include the token sampled just before it.
"""

from __future__ import annotations

import torch

from nucleus.engine.sequence import Sequence
from nucleus.sampling_params import SamplingParams
from nucleus.transfer import to_device


def has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1
        or params.frequency_penalty != 0
        or params.presence_penalty != 0
    )


class PenaltyCounts:
    """Rows of `(vocab,)` output counts and prompt masks for the sequences with penalties."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        self.prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.rows: dict[int, int] = {}  # seq_id -> row
        self._free: list[int] = []

    def _row(self, seq: Sequence) -> int:
        row = self.rows.get(seq.seq_id)
        if row is not None:
            return row
        if not self._free:
            grow = max(self.counts.shape[0], 8)
            first = self.counts.shape[0]
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab_size)])
            self.prompt_mask = torch.cat(
                [self.prompt_mask, self.prompt_mask.new_zeros(grow, self.vocab_size)]
            )
            self._free = list(range(first + grow - 1, first - 1, -1))
        row = self.rows[seq.seq_id] = self._free.pop()
        ids = to_device(seq.token_ids, torch.long, self.device)
        prompt, output = ids[: seq.num_prompt_tokens], ids[seq.num_prompt_tokens :]
        self.prompt_mask[row] = False
        self.prompt_mask[row, prompt] = True
        self.counts[row] = 0
        self.counts[row].index_add_(0, output, torch.ones_like(output, dtype=torch.float32))
        return row

    def gather(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of `seqs`: `(row index (B,), output counts (B, V), prompt masks (B, V))`.
        A row is made at a sequence's first sampled token (a step run from the host's tokens,
        never one launched ahead), from the tokens the host has; `add` counts the rest."""
        rows = to_device([self._row(s) for s in seqs], torch.long, self.device)
        return rows, self.counts.index_select(0, rows), self.prompt_mask.index_select(0, rows)

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one sampled token per row, on the device."""
        flat = rows * self.vocab_size + tokens
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))

    def release(self, seq: Sequence) -> None:
        row = self.rows.pop(seq.seq_id, None)
        if row is not None:
            self._free.append(row)
