"""Checkpoints: all that a run needs to continue *exactly*, written so a crash never costs the last one.

`{output_dir}/step_{N}/` holds

    model.pt            the unwrapped model's state_dict (no DDP `module.` or torch.compile `_orig_mod.`
                        prefix), so it loads into a plain GPT whatever wrapped the model during training
    optimizer.pt        AdamW's moments and step counts
    trainer_state.pt    step, LR scheduler, GradScaler, the run's arguments, and one entry per rank with that
                        rank's RNG states (python, numpy, torch, cuda) and data-stream position

Why each piece. The data position and RNG are per rank because every rank reads its own part of the stream
and draws its own dropout masks: restoring rank 0's state everywhere would replay rank 0's data on all ranks.
With all of it restored, a run on CPU killed with SIGKILL and resumed gives bit-identical losses.

Why the rename. A checkpoint is written into `step_{N}.tmp/` and renamed to `step_{N}/` only when complete;
the rename is atomic, so a crash (or a full disk) mid-save leaves a `.tmp` leftover that `latest` ignores,
and the previous checkpoint stays the one to resume from. Only then are the oldest pruned to `--keep-last`:
pruning first could leave no usable checkpoint at all.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minicodeparrot.dist import is_distributed
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


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer, scheduler, scaler,
                    rank_states: list[dict], meta: dict, keep_last: int) -> Path:
    """Write `step_{step}/` atomically: into `step_{step}.tmp/`, then one rename.

    A crash while writing leaves only a `.tmp` directory, which `latest` ignores, so the previous
    checkpoint stays the one to resume from. Model weights are saved unwrapped (no `module.` / `_orig_mod.`).
    """
    final, tmp = output_dir / f"step_{step}", output_dir / f"step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ranks": rank_states, "meta": meta}, tmp / "trainer_state.pt")
    if final.exists():  # re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
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


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler, world_size: int) -> dict:
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if len(state["ranks"]) != world_size:
        raise UserError(f"{path} was written by {len(state['ranks'])} ranks but this run has {world_size}; "
                        f"resume with the same number of processes (the data position is per rank)")
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    return state


def gather_rank_states(local: dict, world_size: int) -> list[dict]:
    """Every rank's `local` state, in rank order, on rank 0 (an empty list on the other ranks).

    The states travel as torch.save bytes: gather_object's own pickling of tensors fails on CPU storages in
    recent torch. Collective: every rank must call it.
    """
    buf = io.BytesIO()
    torch.save(local, buf)
    if is_distributed():
        gathered = [None] * world_size if dist.get_rank() == 0 else None
        dist.gather_object(buf.getvalue(), gathered, dst=0)
    else:
        gathered = [buf.getvalue()]
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gathered] if gathered else []
