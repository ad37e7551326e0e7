"""scripts/gpu_check.sh as the GPU machine runs it: nothing installed, a preflight line first, one line when
there is no CUDA device, at most 8 files written; and its CPU smoke mode through every section."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# No registry on the GPU machine: a pip call would fail there, so none may happen here either.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_ends_with_one_line_and_installs_nothing(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "GPU_CHECK_SMOKE"}
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=120)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert lines[0].startswith("[gpu_check] preflight: python ") and "torch " in lines[0], lines
    assert "transformers " in lines[0] and "driver" in lines[0]
    assert len(lines) == 2 and "no CUDA device" in lines[1], lines
    assert r.stderr == "" and "pip" not in r.stdout


@pytest.mark.slow
def test_smoke_mode_runs_every_section_and_writes_three_files(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT), str(out)], env={**ENV, "GPU_CHECK_SMOKE": "1"},
                       capture_output=True, text=True, timeout=900)
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("[gpu_check] preflight: "), r.stdout
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tgz"]  # the machine returns <= 8
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["parity", "ceiling", "throughput", "loss_chunk", "resume", "syncs", "xl"]
    assert all(s["status"] == "ok" and s["result"] for s in sections.values()), \
        {n: s.get("error") for n, s in sections.items()}
    assert all(row["ok"] for row in sections["parity"]["result"]["rows"])
    thr = sections["throughput"]["result"]
    assert not thr["errors"], thr["errors"]
    assert all(len(row["tokens_per_s_runs"]) == 3 for row in thr["rows"].values())  # interleaved repeats
    assert "ours compile / transformers compile" in thr["ratios"]
    assert thr["rows"]["ours compile"]["dynamo_warmup"]["frames_compiled"] >= 1
    resume = sections["resume"]["result"]
    assert resume["resume_vs_uninterrupted"]["max"] == 0.0  # on a CPU: bitwise
    assert resume["noise_floor"]["max"] == 0.0 and "loop_data_wait_share" in resume
    assert sections["syncs"]["result"]["syncs_per_step"] == 1
    assert sections["xl"]["result"]["largest_micro_batch"] >= 1
    assert "## throughput" in (out / "gpu_check.md").read_text()
