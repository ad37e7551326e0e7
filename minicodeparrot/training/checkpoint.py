"""Checkpoints: all that a run needs to continue *exactly*, written so a crash never costs the last one.

`{output_dir}/step_{N}/` holds

    model.pt            the unwrapped model's state_dict (no DDP `module.` or torch.compile `_orig_mod.`
                        prefix), so it loads into a plain GPT whatever wrapped the model during training
    optimizer.pt        AdamW's moments and step counts; with --zero (each rank holds only its shard of
                        them) one optimizer_rank{r}.pt per rank instead
    trainer_state.pt    step, LR scheduler, GradScaler, the world size, the run's config and data layout
    rank_{r}.pt         one per rank: that rank's RNG states (python, numpy, torch, cuda) and the states
                        of the data streams it computes (data/streams.py)

Why per rank. Every rank computes its own data streams and draws its own dropout masks. Each rank writes
its own file, so nothing is gathered onto rank 0 (and, under NCCL, nothing travels through GPU memory).
With all of it restored, a run on CPU killed with SIGKILL and resumed gives bit-identical losses.

Any number of ranks can resume it: the data state is kept per virtual stream, not per rank, so a rank of
the new run collects its streams from whichever files hold them; the weights are whole in model.pt; the
optimizer state is whole in optimizer.pt, or put back together from the --zero shards and split again.

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
    # at each step, so both are saved: the local state and the wrapper's hyperparameters. `global_ids`
    # names each local parameter by its index in the whole model's parameter list, so that the shards of
    # W ranks can be put back together and split again for another number of ranks.
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    global_ids = [index[id(p)] for g in optimizer.optim.param_groups for p in g["params"]]
    return {"local": optimizer.optim.state_dict(), "groups": groups, "global_ids": global_ids}


def _load_optimizer_shard(optimizer, shard: dict) -> None:
    optimizer.optim.load_state_dict(shard["local"])
    for group, saved in zip(optimizer.param_groups, shard["groups"], strict=True):
        group.update(saved)


def _full_optimizer_state(path: Path, optimizer, old_world: int) -> dict:
    """The whole optimizer state in plain AdamW's layout (state keyed by the parameter's global index),
    from optimizer.pt or from the W shard files of a --zero run. Both AdamW and ZeRO load it: ZeRO keeps
    the part of it that its own partition of the parameters owns."""
    if (path / "optimizer.pt").is_file():
        return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state: dict = {}
    groups = None
    for r in range(old_world):
        file = path / f"optimizer_rank{r}.pt"
        if not file.is_file():
            raise UserError(f"{path} has no {file.name}: the checkpoint is incomplete; resume from an "
                            "earlier step_N")
        shard = torch.load(file, map_location="cpu", weights_only=True)
        for local, value in shard["local"]["state"].items():
            state[shard["global_ids"][local]] = value
        groups = shard["groups"]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    param_groups = [{**g, "params": list(range(start, start + n))}
                    for g, start, n in zip(groups, starts, sizes, strict=True)]
    return {"state": state, "param_groups": param_groups}


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


def read_trainer_state(path: Path) -> dict:
    """step, scheduler, scaler, world size and meta (the run's config and data layout) of a checkpoint."""
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler, rank: int = 0,
                    world_size: int = 1, streams: list[int] | None = None) -> dict:
    """Restore model, optimizer, schedule and scaler on any number of ranks; return {"step", "meta",
    "rng", "data"}: this rank's RNG state and the saved states of the data `streams` it now computes.

    Model and scheduler are rank-independent. The optimizer is too, once put back together: on the same
    ranks with the same --zero setting each rank reloads exactly what it saved; otherwise every rank reads
    the whole state (regathered from the --zero shards) and keeps its own part. Data stream states are
    collected from whichever rank files hold them (stream s was computed by rank s % W of the saving run).
    """
    state = read_trainer_state(path)
    old_world = state["world_size"]
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    own_shard = path / f"optimizer_rank{rank}.pt"
    if old_world == world_size and is_sharded(optimizer) and own_shard.is_file():
        _load_optimizer_shard(optimizer, torch.load(own_shard, map_location="cpu", weights_only=True))
    else:
        optimizer.load_state_dict(_full_optimizer_state(path, optimizer, old_world))
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    files = {r: None for r in sorted({s % old_world for s in streams or []} | {rank % old_world})}
    for r in files:
        if not (path / f"rank_{r}.pt").is_file():
            raise UserError(f"{path} has no rank_{r}.pt (rank {r} of {old_world} never finished writing it): "
                            "resume from an earlier complete checkpoint")
        files[r] = torch.load(path / f"rank_{r}.pt", map_location="cpu", weights_only=True)
    data = _merge_stream_states([files[s % old_world]["data"] for s in streams or []])
    # The RNG continues exactly on the same ranks; on other ranks dropout masks differ anyway.
    return {"step": state["step"], "meta": state["meta"], "rng": files[rank % old_world]["rng"], "data": data}


def _merge_stream_states(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    if any(p.get("version") != parts[0].get("version") or "streams" not in p for p in parts):
        return parts[0]  # an old per-rank state: the loader names the problem in one line
    merged = dict(parts[0], streams={})
    for p in parts:
        merged["streams"].update(p["streams"])
    return merged
