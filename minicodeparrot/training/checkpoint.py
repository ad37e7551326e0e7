"""Checkpoints: all that a run needs to continue *exactly*, written so a crash never costs the last one.

`{output_dir}/step_{N}/` holds

    model.pt            the unwrapped model's state_dict (no DDP `module.` or torch.compile `_orig_mod.`
                        prefix), so it loads into a plain GPT whatever wrapped the model during training
    optimizer.pt        AdamW's moments and step counts; with --zero (each rank holds only its shard of
                        them) one optimizer_rank{r}.pt per rank instead
    trainer_state.pt    step, LR scheduler, GradScaler, the world size and the run's arguments
    rank_{r}.pt         one per rank: that rank's RNG states (python, numpy, torch, cuda) and data position

Why per rank. Every rank reads its own part of the stream and draws its own dropout masks: restoring rank
0's state everywhere would replay rank 0's data on all ranks. Each rank writes its own file, so nothing is
gathered onto rank 0 (and, under NCCL, nothing travels through GPU memory). With all of it restored, a run
on CPU killed with SIGKILL and resumed gives bit-identical losses.

Why the rename. Everything is written into `step_{N}.tmp/`; after a barrier (every rank has written its
files) rank 0 renames it to `step_{N}/`. The rename is atomic, so a crash (or a full disk) mid-save leaves
a `.tmp` leftover that `latest` ignores, and the previous checkpoint stays the one to resume from. Only
then are the oldest pruned to `--keep-last`: pruning first could leave no usable checkpoint at all.

Multi-node runs: every rank writes into the same directory, so `--output-dir` must be on a filesystem that
all nodes share (NFS, Lustre, a mounted bucket), as for any multi-node checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from minicodeparrot.dist import barrier
from minicodeparrot.errors import UserError


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_sharded(optimizer) -> bool:
    """True for torch's ZeroRedundancyOptimizer: each rank holds only its own shard of the state."""
    return hasattr(optimizer, "optim") and hasattr(optimizer, "consolidate_state_dict")


def _optimizer_shard(optimizer) -> dict:
    # The wrapper's param_groups carry the LR the scheduler set; the local optimizer gets them copied in
    # at each step, so both are saved: the local state and the wrapper's hyperparameters.
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"local": optimizer.optim.state_dict(), "groups": groups}


def _load_optimizer_shard(optimizer, shard: dict) -> None:
    optimizer.optim.load_state_dict(shard["local"])
    for group, saved in zip(optimizer.param_groups, shard["groups"], strict=True):
        group.update(saved)


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer, scheduler, scaler,
                    rank_state: dict, meta: dict, keep_last: int, rank: int = 0, world_size: int = 1) -> Path:
    """Write `step_{step}/` atomically. Collective: every rank calls it with its own `rank_state`."""
    final, tmp = output_dir / f"step_{step}", output_dir / f"step_{step}.tmp"
    if rank == 0:
        if tmp.exists():  # the leftover of a crash at this very step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()  # the directory exists before anyone writes into it
    torch.save(rank_state, tmp / f"rank_{rank}.pt")
    if is_sharded(optimizer):
        torch.save(_optimizer_shard(optimizer), tmp / f"optimizer_rank{rank}.pt")
    if rank == 0:
        torch.save(model.state_dict(), tmp / "model.pt")
        if not is_sharded(optimizer):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "world_size": world_size, "meta": meta}, tmp / "trainer_state.pt")
    barrier()  # every rank's files are on disk before the rename makes the checkpoint visible
    if rank == 0:
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()  # nobody races ahead to a next save while rank 0 is still pruning
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (`.tmp` leftovers of a crash are not checkpoints)."""
    found = [p for p in Path(output_dir).glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(spec: str, output_dir: Path) -> Path | None:
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "trainer_state.pt").is_file():
        raise UserError(f"--resume-from-checkpoint {spec}: no trainer_state.pt there; give a step_N "
                        "directory or 'latest'")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler, rank: int = 0,
                    world_size: int = 1) -> dict:
    """Restore model, optimizer, schedule and scaler; return {"step", "rank_state" (this rank's)}."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if state["world_size"] != world_size:
        raise UserError(f"{path} was written by {state['world_size']} ranks but this run has {world_size}; "
                        f"resume with the same number of processes (the data position is per rank)")
    sharded_file = path / f"optimizer_rank{rank}.pt"
    if is_sharded(optimizer) != sharded_file.is_file():
        saved, now = ("with", "without") if sharded_file.is_file() else ("without", "with")
        raise UserError(f"{path} was saved {saved} --zero and this run is {now} it; resume with the same "
                        "--zero setting (the optimizer state is laid out differently)")
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    if is_sharded(optimizer):
        _load_optimizer_shard(optimizer, torch.load(sharded_file, map_location="cpu", weights_only=True))
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rank_state = torch.load(path / f"rank_{rank}.pt", map_location="cpu", weights_only=True)
    return {"step": state["step"], "meta": state["meta"], "rank_state": rank_state}
