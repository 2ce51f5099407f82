"""Several processes under `torchrun`: who writes, agreeing on the run folder, splitting the recipe's batch.

Rank 0 alone creates, writes and renames the run folder; the HF Trainer shards the data (a distributed sampler)
and saves checkpoints from rank 0 itself. The process group is started here, before the run folder is chosen,
so that rank 0 can pick the (timestamped) folder and tell the others; the Trainer then reuses the group.
Single-process runs never touch torch.distributed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from cmft.errors import CmftError

log = logging.getLogger("cmft")
T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # as TrainingArguments.ddp_timeout: rank 0's evaluation may take a while


def world_size() -> int:
    """Processes started by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 without it): they share its memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's number on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def threads_per_process() -> int:
    """This machine's cores (those the process may run on: a Slurm allocation) shared out among torchrun's
    processes on it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size())


def is_main() -> bool:
    """The process that writes run folders, logs and the final model."""
    return rank() == 0


def launched() -> bool:
    return world_size() > 1


def start() -> None:
    """Join the process group when launched by torchrun (nccl on GPUs, gloo on CPU); a no-op otherwise."""
    if not launched():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)


@functools.cache
def _cpu_group() -> Any:
    """A gloo group for cmft's own small messages (python objects, barriers), whatever the training backend."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=TIMEOUT)


def agree(choose: Callable[[], T]) -> T:
    """`choose()` runs on rank 0 only; every rank gets its result, or raises its error (so all exit alike)."""
    if not launched():
        return choose()
    import torch.distributed as dist

    start()
    message: list[Any] = [None]
    failure: BaseException | None = None
    if is_main():
        try:
            message = [("ok", choose())]
        except CmftError as exc:
            failure, message = exc, [("bad input", str(exc))]
        except BaseException as exc:
            failure, message = exc, [("failed", f"rank 0 failed: {type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(message, src=0, group=_cpu_group())
    if failure is not None:
        raise failure
    kind, value = message[0]
    if kind == "bad input":
        raise CmftError(value)
    if kind == "failed":
        raise RuntimeError(value)
    return value


def barrier() -> None:
    """Wait until every process is here (a no-op in a single process)."""
    if launched():
        import torch.distributed as dist

        start()
        dist.barrier(group=_cpu_group())


def wait_for_all(timeout: timedelta) -> None:
    """A barrier for processes that may reach it hours apart (each inferring its own share of a long job); after
    `timeout` it fails naming the processes that never came."""
    if launched():
        import torch.distributed as dist

        start()
        dist.monitored_barrier(group=_cpu_group(), timeout=timeout, wait_all_ranks=True)


@dataclass(frozen=True)
class BatchSplit:
    """The recipe's batch spread over processes: per_device × processes × accumulation = global."""

    per_device: int
    processes: int
    accumulation: int

    @property
    def global_batch_size(self) -> int:
        return self.per_device * self.processes * self.accumulation

    def report(self) -> dict[str, int]:
        return {
            "global_batch_size": self.global_batch_size,
            "per_device_batch_size": self.per_device,
            "world_size": self.processes,
            "gradient_accumulation": self.accumulation,
        }


def split_batch(batch_size: int, accumulation: int, field: str = "training.batch_size") -> BatchSplit:
    """Divide the recipe's batch (rows per micro-batch, all processes together) across the processes, so the
    global batch — and with it the learning-rate recipe — does not change with the number of processes."""
    processes = world_size()
    if batch_size % processes:
        raise CmftError(
            f"{field}: {batch_size} rows cannot be split evenly across {processes} processes; "
            f"use a multiple of {processes} (the global batch stays {field} × gradient_accumulation)"
        )
    return BatchSplit(per_device=batch_size // processes, processes=processes, accumulation=accumulation)


def quiet_other_ranks() -> None:
    """Log from rank 0 only (warnings and errors from every rank)."""
    if not is_main():
        logging.getLogger("cmft").setLevel(logging.WARNING)
