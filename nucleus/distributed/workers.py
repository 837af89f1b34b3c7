"""The worker processes of `LLM(tensor_parallel_size=N)`: ranks 1 .. N-1, one per device.

The process that builds the `LLM` (the driver) is rank 0 and keeps everything but the other
shards: engine, scheduler, sampler, server. Each worker is started with `spawn`, builds its shard
of the model, joins the process group, then runs what the driver's model runner sends down its
pipe: "build your runner" (the driver's own arguments: the KV caches are allocated and the CUDA
graphs captured in lockstep), then one `ModelStep` after another, until "exit". Only the steps'
plain inputs go through the pipes; tensors move through torch.distributed's collectives alone.

When something fails, the whole group ends with a clear error and no rank is left waiting:
- a worker that fails to build its shard reports it; the driver ends the others and raises it;
- a worker that fails later (joining, building its runner, in a step) reports it and exits; a
  worker that dies is seen by its process sentinel. A monitor thread in the driver watches both:
  it ends the other workers and aborts the process group, so that the driver's pending
  collective fails instead of waiting (gloo fails as soon as its peer's socket closes; NCCL is
  aborted). The driver's step then raises `TensorParallelError`, and every later one too;
- a step that fails in the driver ends the group as well (the workers may be inside a collective
  the driver will not join);
- a GPU spinning in a kernel that waits for a dead peer cannot be freed from inside the process:
  if the driver is still in its step (or waiting for its results) `STUCK_STEP_GRACE_S` after the
  group ended, the monitor ends the driver's process, with the error on stderr (torchrun treats
  a group it launched the same way);
- a worker ends itself when the driver's process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from nucleus.distributed.group import (
    COLLECTIVE_TIMEOUT,
    TensorParallel,
    TensorParallelError,
    cpu_threads_per_rank,
    keep_multicast_off,
)
from nucleus.model import Transformer

log = logging.getLogger(__name__)

# Builds rank `tp.rank`'s shard of the model on `tp.device`; sent to the workers, so it must be
# picklable (a module-level function, or a `functools.partial` of one).
ModelBuilder = Callable[[TensorParallel], Transformer]

STUCK_STEP_GRACE_S = 20.0


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of rank `rank`: `cuda:rank`, or the CPU for every rank."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def check_devices(device: torch.device, world_size: int) -> None:
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ValueError(
                f"tensor parallelism runs rank r on cuda:r: pass device='cuda', not {device}"
            )
        if torch.cuda.device_count() < world_size:
            raise TensorParallelError(
                f"tensor_parallel_size={world_size} needs {world_size} CUDA devices, "
                f"{torch.cuda.device_count()} are visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on CUDA or the CPU, not {device.type}")


class WorkerGroup:
    """The driver's side of a tensor-parallel group: its own rank (`tp`, rank 0) and the
    workers. `start` spawns them; `connect` waits until each has built its shard, then joins."""

    def __init__(
        self,
        tp: TensorParallel,
        processes: list[mp.process.BaseProcess],
        pipes: list[Connection],
        store: dist.TCPStore,
    ) -> None:
        self.tp = tp
        self.processes = processes
        self.pipes = pipes
        self.store = store
        self.failure: str | None = None
        self._in_step = threading.Event()
        self._stop, self._stop_signal = mp.Pipe(duplex=False)
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close)

    @classmethod
    def start(cls, build: ModelBuilder, world_size: int, device: torch.device) -> WorkerGroup:
        """Spawn ranks 1 .. `world_size - 1`, each building its shard with `build`."""
        check_devices(device, world_size)
        keep_multicast_off()  # before the workers copy this environment, and before NCCL starts
        store = dist.TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
            timeout=COLLECTIVE_TIMEOUT,
        )  # fmt: skip
        context = mp.get_context("spawn")
        processes, pipes = [], []
        for rank in range(1, world_size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(rank, world_size, rank_device(device, rank), store.port, build, theirs),
                name=f"nucleus-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            processes.append(process)
            pipes.append(ours)
        return cls(TensorParallel(0, world_size, rank_device(device, 0)), processes, pipes, store)

    def connect(self) -> None:
        """Wait until every worker has built its shard (or raise the first failure, after ending
        the group), then join the process group and watch the workers."""
        waiting = dict(enumerate(self.pipes, start=1))
        while waiting:
            sentinels = {self.processes[r - 1].sentinel: r for r in waiting}
            for ready in wait([*waiting.values(), *sentinels]):
                rank = sentinels.get(ready) or next(r for r, p in waiting.items() if p is ready)
                report = self._report(rank)
                if report != "loaded":
                    self._kill()  # the others may wait in the group's rendezvous
                    self.close()
                    raise TensorParallelError(f"tensor-parallel rank {rank} {report}")
                waiting.pop(rank, None)
        self.tp.join(self.store)
        self._monitor = threading.Thread(target=self._watch, name="nucleus-tp-monitor", daemon=True)
        self._monitor.start()

    def _report(self, rank: int) -> str:
        """What worker `rank` has to say: "loaded", or why it failed or died."""
        pipe, process = self.pipes[rank - 1], self.processes[rank - 1]
        with contextlib.suppress(EOFError, OSError):
            if pipe.poll():
                kind, message = pickle.loads(pipe.recv_bytes())
                return "loaded" if kind == "loaded" else f"failed {message}"
        process.join(1.0)
        return f"died (exit code {process.exitcode})"

    # ---- driving the workers ----------------------------------------------------------------
    def start_runners(self, **options: object) -> None:
        """Each worker builds its `ModelRunner` with these arguments (the driver's)."""
        self._send(("runner", options))

    def _send(self, message: tuple[str, object]) -> None:
        self.check()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for pipe in self.pipes:
                pipe.send_bytes(data)
        except OSError as e:
            raise TensorParallelError(self._end(f"lost a worker ({e!r})")) from None

    def send(self, step: object) -> None:
        """Each worker runs this `ModelStep` (the driver runs its own part in `lockstep`)."""
        self._send(("step", step))

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Around the driver's part of work that every rank does together (collectives): a
        failure in it ends the group, and so does one elsewhere meanwhile."""
        self._in_step.set()
        try:
            yield
        except Exception as e:
            raise TensorParallelError(self._end(f"rank 0 failed: {e!r}")) from e
        finally:
            self._in_step.clear()
        self.check()

    def check(self) -> None:
        """Raise the group's failure, if any (or that it was shut down)."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        if self._closed:
            raise TensorParallelError("the tensor-parallel group is shut down")

    # ---- failure and shutdown ---------------------------------------------------------------
    def _end(self, cause: str) -> str:
        """Record the group's failure (once) and kill the workers; returns the failure: a worker
        that reported a failure or died, if one did within a second (a collective in the driver
        fails as soon as its peer is gone), else `cause`."""
        with self._lock:
            if self.failure is None:
                signals = {p.sentinel: r for r, p in enumerate(self.processes, start=1)}
                signals |= {p: r for r, p in enumerate(self.pipes, start=1)}
                rank = min((signals[s] for s in wait(list(signals), 1.0)), default=None)
                why = cause if rank is None else f"rank {rank} {self._report(rank)}"
                self.failure = f"the tensor-parallel group ended: {why}"
                log.error(self.failure)
            self._kill()
            return self.failure

    def _kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()

    def _watch(self) -> None:
        """The monitor thread: wait for a worker to report a failure or die, then end the group."""
        signals = [p.sentinel for p in self.processes] + self.pipes
        if self._stop in wait([self._stop, *signals]):
            return
        self._end("a worker is gone")
        if self.tp.device.type != "cuda":
            return  # gloo's collectives fail by themselves once a peer is gone
        with contextlib.suppress(Exception):  # NCCL's kernels leave their loops when aborted
            dist.distributed_c10d._abort_process_group()
        deadline = time.monotonic() + STUCK_STEP_GRACE_S
        while self._in_step.is_set():
            if time.monotonic() > deadline:
                sys.stderr.write(f"nucleus: {self.failure}; the GPU is stuck: exiting\n")
                sys.stderr.flush()
                os._exit(1)
            time.sleep(0.1)

    def close(self) -> None:
        """End the workers (they finish the message they are on) and leave the group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._stop_signal.send(None)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        with contextlib.suppress(OSError):
            for pipe in self.pipes:
                pipe.send_bytes(pickle.dumps(("exit", None)))
        for process in self.processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for pipe in self.pipes:
            pipe.close()
        self.tp.leave()


def _exit_with_parent() -> None:
    """A worker's watch on the driver: when the driver's process ends, so does the worker (it may
    be inside a collective that will never complete)."""
    parent = mp.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)


def _worker_main(
    rank: int,
    world_size: int,
    device: torch.device,
    port: int,
    build: ModelBuilder,
    pipe: Connection,
) -> None:
    """A worker process: build the shard, join, then run the driver's messages."""
    from nucleus.engine.runner import ModelRunner

    threading.Thread(target=_exit_with_parent, name="nucleus-tp-parent", daemon=True).start()
    tp = TensorParallel(rank, world_size, device)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(cpu_threads_per_rank(world_size))
        model = build(tp)
    except BaseException as e:
        traceback.print_exc()
        pipe.send_bytes(pickle.dumps(("failed", f"to build its shard: {type(e).__name__}: {e}")))
        return
    pipe.send_bytes(pickle.dumps(("loaded", None)))
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT
        )
        tp.join(store)
        runner = None
        while True:
            kind, arg = pickle.loads(pipe.recv_bytes())
            if kind == "step":
                runner.run(arg)
            elif kind == "runner":
                runner = ModelRunner(model, **arg)
            else:
                break
    except EOFError:  # the driver is gone
        os._exit(1)
    except BaseException as e:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            pipe.send_bytes(pickle.dumps(("failed", f"while running: {type(e).__name__}: {e}")))
        os._exit(1)
    tp.leave()
