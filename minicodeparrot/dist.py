"""Process-group set-up and the few collectives the package uses, in one place.

Every data-parallel piece of the package asks the same two questions: "which rank am I, out of how many?"
and "is there a process group to talk through?". Asking `torch.distributed` directly in each module gave
five slightly different answers (some forgot `is_available()`, which is False on builds without
distributed support); they all ask here instead.

Under `torchrun` the environment holds RANK, WORLD_SIZE and LOCAL_RANK before `init_process_group` runs.
`rank_and_world()` reads them then too, so datasets built before the process group exists already take
their own share of the data.

Restarts. `torchrun --max-restarts N` starts a fresh worker group when a worker dies, and the new workers
meet through the same key-value store as the dead ones (the agent's TCPStore, kept across restarts). The
keys a process group writes there at start-up (each rank's address, for gloo) are still there from the
previous attempt, so a new rank can read a dead rank's address and the group never forms ("Connection
refused" in gloo's connectFullMesh). Each attempt's group therefore gets a namespace of its own in that
store; `_attempt_store` explains how all ranks agree on it.
"""

from __future__ import annotations

import os
import time
import uuid
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
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    group: dict[str, Any] = {"backend": "nccl" if cuda else "gloo"}
    if timeout is not None:  # None: torch's own default
        group["timeout"] = timeout
    if cuda:
        torch.cuda.set_device(device)
        group["device_id"] = device
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store outlives the workers
        group.update(store=_attempt_store(rank, world), rank=rank, world_size=world)
    dist.init_process_group(**group)
    return DistInfo(rank, local_rank, world, device)


_KEYS = "minicodeparrot/"  # everything this module keeps in torchrun's store lives under this prefix


def _attempt_store(rank: int, world: int) -> dist.PrefixStore:
    """This attempt's own namespace in the torchrun agent's store, the same on every rank of the attempt.

    The attempt needs a number every rank agrees on. TORCHELASTIC_RESTART_COUNT will not do: a node's agent
    counts only the restarts its own workers caused, so after one node's worker dies the nodes disagree
    (pytorch #108158). A shared counter every rank bumps once per attempt (number = (value-1) // world) is
    not enough either: a rank killed before it bumped leaves its attempt short, and every later attempt
    then splits across two numbers and never forms. What does hold: torchrun stops every worker of an
    attempt, on every node, before any worker of the next one starts. So stale keys only ever come from dead
    processes, and what a live process writes cannot be confused with theirs if it carries a fresh nonce.

    Rank 0 (every attempt has one) takes the next number from a counter: numbers are unique and growing,
    gaps left by attempts that died early do not matter. Every other rank writes a fresh nonce under its
    rank and waits for rank 0 to answer that nonce with the number. Rank 0 cannot tell a live rank's
    nonce from one a dead rank left behind, so it answers whatever nonce it finds and waits for the
    acknowledgement that only a live rank sends; if the rank's key changes meanwhile (the live rank
    arrived after rank 0 read a dead one's nonce), it answers the new one.
    """
    timeout = timedelta(minutes=30)  # torch's default process-group timeout: a slow node may take long
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    if rank == 0:
        attempt = store.add(_KEYS + "attempts", 1)
        _welcome(store, world, attempt)
    else:
        nonce = uuid.uuid4().hex
        store.set(f"{_KEYS}join/{rank}", nonce)
        attempt = int(store.get(f"{_KEYS}welcome/{nonce}"))
        store.set(f"{_KEYS}ack/{nonce}", "")
    return dist.PrefixStore(f"{_KEYS}attempt_{attempt}/", store)


def _welcome(store: dist.Store, world: int, attempt: int) -> None:
    """Rank 0's side of `_attempt_store`: answer every rank's nonce until a live process acknowledges it."""
    answered: dict[int, str | None] = {rank: None for rank in range(1, world)}
    while answered:
        for rank, old in list(answered.items()):
            nonce = store.get(f"{_KEYS}join/{rank}").decode()  # blocks until the rank has written one, ever
            # An acknowledged nonce that was not answered now is an earlier attempt's: wait for a new one.
            if nonce != old and not store.check([f"{_KEYS}ack/{nonce}"]):
                store.set(f"{_KEYS}welcome/{nonce}", str(attempt))
                answered[rank] = nonce
            if answered[rank] is not None and store.check([f"{_KEYS}ack/{answered[rank]}"]):
                del answered[rank]
        time.sleep(0.01)


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
