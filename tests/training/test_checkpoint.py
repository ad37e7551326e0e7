"""Checkpoints: atomic write, keep-last pruning, resume lookup, world-size check, RNG round trip.

Whole-run resume (SIGKILL then bitwise-equal losses, SIGTERM under torchrun) is tested in test_train.py.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from minicodeparrot.errors import UserError
from minicodeparrot.model.gpt import GPT, GPTConfig
from minicodeparrot.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from minicodeparrot.training.train import make_optimizer, make_scheduler


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, n_positions=64))


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_rng_state_round_trips_every_generator():
    buf = io.BytesIO()
    torch.save({"rng": rng_state()}, buf)  # as it travels through a rank_{r}.pt file
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["rng"]
    first = _draws()
    _draws()
    set_rng_state(state)
    assert _draws() == first


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _tiny_gpt()
    opt = make_optimizer(model, 1e-3, 0.1)
    sched = make_scheduler(opt, 1, 10, "cosine")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rank_state = {"rng": rng_state(), "data": {"epoch": 0}}
    save_checkpoint(tmp_path, 1, model, opt, sched, scaler, rank_state, {}, keep_last=3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save, n = torch.save, []

    def dying_save(obj, path, *a, **k):
        n.append(path)
        if len(n) == 2:
            raise OSError("disk full")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, opt, sched, scaler, rank_state, {}, keep_last=3)
    monkeypatch.undo()
    assert (tmp_path / "step_2.tmp").exists() and not (tmp_path / "step_2").exists()
    latest = resolve_resume("latest", tmp_path)
    assert latest == tmp_path / "step_1"
    fresh = _tiny_gpt(seed=5)
    opt2 = make_optimizer(fresh, 1e-3, 0.1)
    state = load_checkpoint(latest, fresh, opt2, make_scheduler(opt2, 1, 10, "cosine"), scaler, streams=[0])
    assert state["step"] == 1 and state["data"] == {"epoch": 0}
    assert set(state["rng"]) == set(rank_state["rng"])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k])
    for step in (2, 3, 4):  # a later save replaces the leftover .tmp; keep_last prunes the oldest
        save_checkpoint(tmp_path, step, model, opt, sched, scaler, rank_state, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    # Any number of ranks may load it (data/streams.py); a missing rank file is named in one line.
    state = load_checkpoint(tmp_path / "step_4", fresh, opt2, make_scheduler(opt2, 1, 10, "cosine"),
                            scaler, rank=1, world_size=2, streams=[1])
    assert state["step"] == 4
    (tmp_path / "step_4" / "rank_0.pt").unlink()
    with pytest.raises(UserError, match=r"has no rank_0.pt \(rank 0 of 1 never finished writing it\)"):
        load_checkpoint(tmp_path / "step_4", fresh, opt2, make_scheduler(opt2, 1, 10, "cosine"),
                        scaler, rank=1, world_size=2, streams=[1])
