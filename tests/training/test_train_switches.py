"""Every switch the presets turn on, through `train` end to end on CPU: --mixed-precision bf16,
--gradient-checkpointing, --compile (the real inductor backend, which builds C++ kernels with the system's
compiler) and all three together; and fp16 with its GradScaler.

Each switch's run is compared with the same run in fp32 eager mode (losses within the tolerance stated in
TOLERANCE), then run again, SIGKILLed after its first checkpoint and resumed: the resumed steps' losses must
equal the uninterrupted run's bit for bit. The helpers and the corpus fixture are test_train.py's.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_train
import torch
from test_train import ENV, _args, _kill_tree, _metrics

from minicodeparrot.training import train as T

SWITCHES = {
    "bf16": ("--mixed-precision", "bf16"),
    "checkpointing": ("--gradient-checkpointing",),
    "compile": ("--compile",),
    "all three": ("--mixed-precision", "bf16", "--gradient-checkpointing", "--compile"),
}
# Largest |loss - fp32 eager loss| over the 6 steps (measured: bf16 8e-5, checkpointing 0, compile and all
# three 0.014). Activation checkpointing recomputes the same ops with the same dropout masks (non-reentrant
# checkpointing restores the RNG): bitwise equal. bf16 rounds every matmul input to 8 significant bits.
# Inductor fuses and reorders fp32 arithmetic and draws dropout masks from its own Philox stream rather than
# eager's generator, so its masks differ: with dropout 0.1 that moves a 5.7-nat loss by a few hundredths.
TOLERANCE = {"bf16": 1e-3, "checkpointing": 0.0, "compile": 0.05, "all three": 0.05}
STEPS, EVERY = 6, 3
COMMON = ("--max-train-steps", str(STEPS), "--save-checkpoint-steps", str(EVERY), "--max-eval-steps", "1")
TRAIN = [sys.executable, "-m", "minicodeparrot", "train"]


def _train(work: dict, out: Path, *extra: str) -> dict[int, float]:
    r = subprocess.run([*TRAIN, *_args(work, out, *COMMON, *extra)], env=ENV, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return _metrics(out)[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """test_train.py's corpus, tokenizer and 2-layer model config (dropout 0.1), built for this module."""
    return test_train.work.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def fp32_eager(work, tmp_path_factory) -> dict[int, float]:
    return _train(work, tmp_path_factory.mktemp("fp32") / "run")


def _killed_and_resumed(work: dict, out: Path, *extra: str) -> tuple[dict[int, float], int]:
    """Start the run, SIGKILL its whole process tree once step EVERY is saved, resume with `latest`."""
    proc = subprocess.Popen([*TRAIN, *_args(work, out, *COMMON, *extra)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not (out / f"step_{EVERY}").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_tree(proc.pid)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    resumed_from = max(int(p.name.split("_")[1]) for p in out.glob("step_*"))
    assert resumed_from < STEPS
    again = subprocess.run([*TRAIN, *_args(work, out, *COMMON, *extra, "--resume-from-checkpoint", "latest")],
                           env=ENV, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / f'step_{resumed_from}'}" in again.stderr
    return _metrics(out)[0], resumed_from


@pytest.mark.parametrize("name", [
    "bf16", "checkpointing",
    pytest.param("compile", marks=pytest.mark.slow), pytest.param("all three", marks=pytest.mark.slow)])
def test_switch_matches_fp32_eager_and_resumes_bitwise(work, fp32_eager, tmp_path, name):
    losses = _train(work, tmp_path / "full", *SWITCHES[name])
    assert sorted(losses) == list(range(1, STEPS + 1))
    ran = json.loads((tmp_path / "full" / "train_args.json").read_text())
    assert (ran["mixed_precision"] == "bf16") == ("--mixed-precision" in SWITCHES[name])
    assert ran["gradient_checkpointing"] == ("--gradient-checkpointing" in SWITCHES[name])
    assert ran["compile"] == ("--compile" in SWITCHES[name])
    diffs = [abs(losses[s] - fp32_eager[s]) for s in losses]
    assert max(diffs) <= TOLERANCE[name], diffs
    if name != "checkpointing":
        assert max(diffs) > 0  # the switch really changed the arithmetic
    resumed, resumed_from = _killed_and_resumed(work, tmp_path / "cut", *SWITCHES[name])
    for s in range(resumed_from + 1, STEPS + 1):
        assert resumed[s] == losses[s], (s, resumed[s], losses[s])  # bitwise, not approx
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == \
        (tmp_path / "full" / "model.safetensors").read_bytes()


# --- fp16: GradScaler ----------------------------------------------------------------------------------
def test_fp16_grad_scaler_skips_an_inf_step_shrinks_the_scale_and_resumes_exactly(work, tmp_path,
                                                                                  monkeypatch):
    """torch 2.13 runs fp16 autocast and GradScaler on CPU, so the loss-scaling path is tested here: a step
    whose gradients overflow updates nothing, halves the scale, and the scale resumes from the checkpoint."""
    from minicodeparrot.cli import build_parser

    real = T.accumulate_gradients
    calls, updates = [], []

    def overflowing(model, *a, **k):
        loss = real(model, *a, **k)
        calls.append(1)
        if len(calls) == 2:  # fp16 overflow: inf gradients, the loss itself still finite
            next(T.unwrap(model).parameters()).grad.fill_(math.inf)
        return loss

    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(T, "accumulate_gradients", overflowing)
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (updates.append(1), real_step(self))[1])

    def run(out: Path, steps: int, *extra: str) -> dict:
        argv = _args(work, out, "--max-train-steps", str(steps), "--save-checkpoint-steps", "2",
                     "--max-eval-steps", "1", "--mixed-precision", "fp16", *extra)
        return T.train(build_parser().parse_args(["train", *argv]))

    run(tmp_path / "full", 4)
    assert len(calls) == 4 and len(updates) == 3  # step 2's update skipped by the scaler
    scalers = {s: torch.load(tmp_path / "full" / f"step_{s}" / "trainer_state.pt",
                             weights_only=True)["scaler"] for s in (2, 4)}
    init_scale = torch.amp.GradScaler("cpu").get_scale()
    assert scalers[2]["scale"] == init_scale / 2 and scalers[4]["scale"] == init_scale / 2
    assert scalers[4]["_growth_tracker"] == 2  # two good steps since the overflow

    # Resume from step 2 (the scale already halved) in a fresh directory: steps 3 and 4 and the scaler's
    # state equal the uninterrupted run's exactly.
    import shutil

    shutil.copytree(tmp_path / "full" / "step_2", tmp_path / "resumed" / "step_2")
    calls.append(1)  # no overflow in the resumed run
    run(tmp_path / "resumed", 4, "--resume-from-checkpoint", "latest")
    full, resumed = _metrics(tmp_path / "full")[0], _metrics(tmp_path / "resumed")[0]
    assert {s: resumed[s] for s in (3, 4)} == {s: full[s] for s in (3, 4)}
    again = torch.load(tmp_path / "resumed" / "step_4" / "trainer_state.pt", weights_only=True)["scaler"]
    assert again == scalers[4]
