"""Tensor parallelism over torch.distributed: one model across several devices (or processes).

- `group.py`: `TensorParallel`, a process's rank in the group and the collectives (NCCL on CUDA,
  gloo on the CPU; a one-shot all-reduce over symmetric memory for small sums on CUDA);
- `layers.py`: the sharded layers (column- and row-parallel linears, the vocabulary-parallel
  embedding) and the split table they carry, which the loaders read to shard, merge and re-shard;
- `workers.py`: the worker processes `LLM(tensor_parallel_size=N)` starts, one per extra device,
  driven step by step by the engine's process.

`Llama.build(model_parallel_size=N)` runs under `torchrun` instead: every rank runs the reference
loop itself, as Meta's does. `docs/tensor-parallel.md` describes the whole.
"""

from nucleus.distributed.group import TensorParallel, TensorParallelError
from nucleus.distributed.layers import Split, check_shardable, checkpoint_layout

__all__ = ["Split", "TensorParallel", "TensorParallelError", "check_shardable", "checkpoint_layout"]
