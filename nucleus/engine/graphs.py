"""Decode steps on static buffers, replayed from CUDA graphs captured per batch-size bucket.

A decode step (one new token per sequence) has the same shapes whatever the sequences' contexts:
only the contents of a few small tensors change (token ids, positions, cache slots, context
lengths, block tables). `DecodeStep` keeps those tensors in one static device buffer, fills it
from one pinned host buffer with a single copy per step, and runs the model plus the LM head
either eagerly or by replaying the graph captured for the smallest bucket that holds the batch.
Rows past the batch are pad rows: slot -1 (nothing stored) and context 0 (nothing read), so
their logits are zeros and are never looked at. All graphs share one memory pool; each is
captured after a warm-up pass has compiled the kernels.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from nucleus.attention.base import AttentionBackend
from nucleus.model import Transformer

log = logging.getLogger(__name__)


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a captured graph: 1, 2, 4, 8, then every 8 up to `max_num_seqs`."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


class DecodeStep:
    """The runner's static inputs for decode steps, and the graphs that replay them."""

    def __init__(
        self,
        model: Transformer,
        backend: AttentionBackend,
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        use_graphs: bool,
    ) -> None:
        self.model = model
        self.backend = backend
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        device = backend.kv.device
        n = max_num_seqs
        # Layout: [table width | tokens | positions | slots | contexts | source rows |
        # block tables (n rows)]; source rows: where each row's token is in a device tensor.
        self._size = 1 + 5 * n + n * max_blocks_per_seq
        self._device_buf = torch.zeros(self._size, dtype=torch.int32, device=device)
        # Two host staging buffers, used in turn: a step may be filled while the copy of the step
        # before (launched ahead, see `LLMEngine.step`) has not left its buffer yet.
        pin = device.type == "cuda"
        self._staging = [torch.zeros(self._size, dtype=torch.int32, pin_memory=pin) for _ in "ab"]
        self._copied = [torch.cuda.Event() if pin else None for _ in "ab"]
        self._turn = 0
        self._host_buf = self._staging[0]
        self._host = self._host_buf.numpy()
        d = self._device_buf
        self.width = d[:1]
        self.tokens, self.positions, self.slots, self.contexts, self.source_rows = d[
            1 : 1 + 5 * n
        ].view(5, n)
        self.tables = d[1 + 5 * n :]
        self.buckets = graph_buckets(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._set_pad_rows(0)
        if use_graphs:
            self._capture()

    def _set_pad_rows(self, first: int) -> None:
        n, h = self.max_num_seqs, self._host
        for offset, value in ((1, 0), (1 + n, 0), (1 + 2 * n, -1), (1 + 3 * n, 0)):
            h[offset + first : offset + n] = value

    def _next_staging(self) -> None:
        """Switch to the other staging buffer, once its last copy to the device is done."""
        self._turn = 1 - self._turn
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        self._host_buf = self._staging[self._turn]
        self._host = self._host_buf.numpy()

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    def _run(self, size: int) -> torch.Tensor:
        meta = self.backend.decode_metadata(
            self.slots[:size], self.contexts[:size], self.tables, self.width
        )
        hidden = self.model.forward(self.tokens[:size], self.positions[:size], self.backend, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        self._device_buf.copy_(self._host_buf)  # every row a pad row
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):  # largest first: later graphs reuse its memory
            self._run(size)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._run(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d decode graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.buckets,
            time.perf_counter() - start,
        )

    @torch.inference_mode()
    def __call__(
        self,
        positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        *,
        token_ids: list[int] | None = None,
        token_source: tuple[torch.Tensor, list[int]] | None = None,
    ) -> torch.Tensor:
        """Logits `(B, V)` float32 of one decode step: row `i` feeds its token at `positions[i]`
        (its context is `positions[i] + 1` tokens) through `block_tables[i]`. The tokens are
        `token_ids`, or `token_source = (device tensor, index of each row's token in it)`: tokens
        sampled by the step before, not yet seen by the host."""
        batch = len(positions)
        size = self.bucket(batch)
        self._next_staging()
        n, h = self.max_num_seqs, self._host
        pos = np.asarray(positions, dtype=np.int64)
        width = max(map(len, block_tables))
        h[0] = width
        if token_ids is not None:
            h[1 : 1 + batch] = token_ids
        else:
            h[1 : 1 + batch] = 0
            h[1 + 4 * n : 1 + 4 * n + batch] = token_source[1]
        h[1 + n : 1 + n + batch] = pos
        rows = np.fromiter(
            (table[p // block_size] for table, p in zip(block_tables, positions, strict=True)),
            dtype=np.int64,
            count=batch,
        )
        h[1 + 2 * n : 1 + 2 * n + batch] = rows * block_size + pos % block_size
        h[1 + 3 * n : 1 + 3 * n + batch] = pos + 1
        self._set_pad_rows(batch)
        tables = h[1 + 5 * n : 1 + 5 * n + batch * width].reshape(batch, width)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = table
        used = 1 + 5 * n + batch * width
        self._device_buf[:used].copy_(self._host_buf[:used], non_blocking=True)
        if self._copied[self._turn] is not None:
            self._copied[self._turn].record()
        if token_source is not None:
            self.tokens[:batch].copy_(token_source[0].index_select(0, self.source_rows[:batch]))
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:batch]
        # Eagerly, the same padded shapes as the graph: the same kernels, the same results.
        return self._run(size)[:batch]
