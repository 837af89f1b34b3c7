"""`TensorParallel`: this process's rank in a tensor-parallel group, and the collectives that the
sharded layers call.

One process per device, every rank running the same model steps in lockstep; the collectives are
torch.distributed's (NCCL on CUDA, gloo on the CPU), on its default process group. With one rank
nothing is called and nothing needs initialising. On CUDA, small all-reduces (a decode step's
activations) go through torch's one-shot all-reduce over symmetric memory instead of NCCL:
`docs/tensor-parallel.md` gives the measurements that decided it.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# NVLink multicast (NCCL's NVLS, symmetric memory's multimem, NVSHMEM's NVLS) is never used here,
# and on shared hosts a program that sets it up can take the GPUs out of service: every process
# of a group keeps it off unless its environment already says otherwise.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# A collective that waits longer than this for a peer fails (a rank compiling kernels the first
# time can keep the others waiting for a while; a dead one is noticed much sooner, see workers.py).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def cpu_threads_per_rank(world_size: int) -> int:
    """The cores shared out between the ranks of a group on the CPU."""
    return max(1, (os.cpu_count() or 1) // world_size)


def keep_multicast_off() -> None:
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)


class TensorParallelError(RuntimeError):
    """The tensor-parallel group cannot go on: a rank failed to load, failed in a step or died."""


class TensorParallel:
    """Rank `rank` of `world_size`, running its shard of the model on `device`.

    The sharded layers call `all_reduce` and `all_gather`, the model runner `broadcast`; all are
    identities with one rank. `join` connects the ranks (torch.distributed's default group)
    before the first collective.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.group: dist.ProcessGroup | None = None
        self.one_shot: OneShotAllReduce | None = None
        self._owns_group = False

    @classmethod
    def from_torchrun(cls, world_size: int, device: torch.device | str | None) -> TensorParallel:
        """This process's place in a group started by `torchrun --nproc_per_node N` (its env vars:
        RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joined. `device`: "cuda" (or None
        with CUDA present) runs rank `LOCAL_RANK` on `cuda:LOCAL_RANK`; "cpu" runs every rank on
        the CPU, over gloo."""
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != world_size:
            raise TensorParallelError(
                f"model_parallel_size={world_size} needs {world_size} processes, one per rank: "
                f"start them with `torchrun --nproc_per_node {world_size} script.py` "
                f"(this process is one of {env_world})"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
        tp = cls(int(os.environ.get("RANK", "0")), world_size, device)
        tp.join()
        return tp

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", self.rank))

    def join(self, store: dist.Store | None = None) -> None:
        """Join the group: through `store` (the workers of `LLM`), or torchrun's environment
        when torch.distributed is not initialised yet. Sets this process's CUDA device."""
        if self.world_size == 1:
            return
        keep_multicast_off()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                store=store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=COLLECTIVE_TIMEOUT,
                device_id=self.device if cuda else None,
            )
            self._owns_group = True
            atexit.register(self.leave)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise TensorParallelError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, not rank {self.rank} of {self.world_size}"
            )
        self.group = dist.group.WORLD
        if cuda:
            self.one_shot = OneShotAllReduce.create(self)

    def leave(self) -> None:
        """Leave the group (destroying it if `join` created it); safe to call twice."""
        self.one_shot = None
        if self._owns_group:
            atexit.unregister(self.leave)
            if dist.is_initialized():
                dist.destroy_process_group()
        self._owns_group = False
        self.group = None

    # ---- what the sharded layers call -------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (in place in `x`, or a new tensor)."""
        if self.world_size == 1:
            return x
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x (..., k)` side by side in the last dim, in rank order:
        `(..., world_size * k)`."""
        if self.world_size == 1:
            return x
        stacked = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(stacked, x.contiguous(), group=self.group)
        return stacked.view(self.world_size, *x.shape).movedim(0, -2).flatten(-2)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x`, on every rank (in place in `x`)."""
        if self.world_size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x

    # ---- agreement --------------------------------------------------------------------------
    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether `what` worked for it; if it failed anywhere, every rank raises
        (a rank its own error, the others one that names the ranks that failed), so that no rank
        goes on to wait for a peer that will never come."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        reports: list[str | None] = [None] * self.world_size
        dist.all_gather_object(reports, None if error is None else repr(error), group=self.group)
        if error is not None:
            raise error
        failed = {r: m for r, m in enumerate(reports) if m is not None}
        if failed:
            raise TensorParallelError(
                f"{what} failed on rank(s) {sorted(failed)}: "
                + "; ".join(f"rank {r}: {m}" for r, m in failed.items())
            )


def _all_gather_single(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """torch.distributed's gather into one tensor (renamed `all_gather_single` in torch 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


class OneShotAllReduce:
    """The sum of a small tensor over the ranks of one host in one kernel: each rank copies its
    tensor into its buffer of symmetric memory, and every rank reads and adds all the buffers over
    NVLink (`torch.ops.symm_mem.one_shot_all_reduce_copy`; peer-to-peer loads, no multicast). It
    is launched on the current stream, so a CUDA graph captures it like any kernel."""

    MAX_BYTES = 1 << 20  # a decode batch of 64 rows of 8,192 bf16; larger sums go through NCCL
    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer = buffer
        self.group_name = group_name

    @classmethod
    def create(cls, tp: TensorParallel) -> OneShotAllReduce | None:
        """The kernel's buffer, set up on every rank; None (NCCL for every sum) where
        `NUCLEUS_ONE_SHOT_ALL_REDUCE=0`, or where torch cannot set it up on some rank."""
        if os.environ.get("NUCLEUS_ONE_SHOT_ALL_REDUCE", "1") == "0":
            return None
        keep_multicast_off()  # peer-to-peer buffers only: never a multicast object
        one_shot = None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
                buffer = symm_mem.empty(cls.MAX_BYTES, dtype=torch.uint8, device=tp.device)
                symm_mem.rendezvous(buffer, tp.group)
                one_shot = cls(buffer, tp.group.group_name)
        except (ImportError, AttributeError, RuntimeError) as e:  # e.g. torch < 2.9's set-up
            log.warning("one-shot all-reduce unavailable (%s): every sum goes through NCCL", e)
        # Every rank must make the same choice: one falling back alone would wait forever.
        agreed = torch.tensor([int(one_shot is not None)], device=tp.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=tp.group)
        return one_shot if agreed.item() else None

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype in self.DTYPES and x.numel() * x.element_size() <= self.MAX_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        slot = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x, "sum", self.group_name)
