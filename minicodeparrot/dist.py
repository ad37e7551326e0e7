"""Process-group set-up and the few collectives the package uses, in one place.

Every data-parallel piece of the package asks the same two questions: "which rank am I, out of how many?"
and "is there a process group to talk through?". Asking `torch.distributed` directly in each module gave
five slightly different answers (some forgot `is_available()`, which is False on builds without
distributed support); they all ask here instead.

Under `torchrun` the environment holds RANK, WORLD_SIZE and LOCAL_RANK before `init_process_group` runs.
`rank_and_world()` reads them then too, so datasets built before the process group exists already take
their own share of the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: its global rank, its GPU on the node (local_rank), the world size."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True once a process group exists (False on a torch built without distributed support)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the process group, else from torchrun's environment, else (0, 1)."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(timeout: timedelta | None = None) -> DistInfo:
    """Join torchrun's process group; without torchrun, run as one process on the first GPU (or the CPU).

    NCCL for GPUs and gloo for CPUs. `device_id` binds the NCCL communicator to this rank's GPU at once,
    so the first collective does not have to guess it (and warn, or hang when guessing wrong). `timeout`:
    how long a collective may wait for the other ranks before it fails (None: torch's default, 10 minutes
    for NCCL, 30 for gloo).
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 0, 1, torch.device("cuda" if cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo", timeout=timeout)
    return DistInfo(rank, local_rank, world, device)


def teardown_distributed() -> None:
    """Leave the process group, if there is one (idempotent)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place; a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
