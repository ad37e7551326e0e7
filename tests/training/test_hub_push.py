"""training/hub_push.py: background checkpoint pushes against the loopback Hub, faults included.

A simulated run saves into one folder (as training does: each save overwrites the previous files), hands it
to the pusher, and goes on. The Hub fails requests at random, or is down for a while, or rejects the token."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from hubserver import HubServer, offline_hub_env

from minicodeparrot.model.gpt import GPT, GPTConfig
from minicodeparrot.sources import hub
from minicodeparrot.tokenizer.bpe import Tokenizer
from minicodeparrot.training.hub_push import HubPusher

REPO = "me/run"
TOKEN = "hf_write123"


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch) -> None:
    offline_hub_env(monkeypatch, tmp_path, TOKEN, max_delay=0.01)


@pytest.fixture
def server(tmp_path: Path, monkeypatch):
    with HubServer(upload_dir=tmp_path / "hub", token=TOKEN, cross_host=True) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


def save(folder: Path, step: int, tokenizer: Tokenizer) -> dict[str, str]:
    """What train does at a save: the HF layout and the metrics so far, over the previous save's files."""
    torch.manual_seed(step)
    config = GPTConfig(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=len(tokenizer))
    GPT(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 10.0 / step}) + "\n")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def covered_steps(server: HubServer) -> list[int]:
    """Every step named by a commit message: "step 30" or "step 30 (also covers step 10, 20)"."""
    steps = []
    for commit in server.commits[REPO]:
        head, _, rest = commit["summary"].partition(" (also covers step ")
        steps.append(int(head.removeprefix("step ")))
        steps += [int(s) for s in rest.rstrip(")").split(", ") if s]
    return sorted(steps)


def test_run_on_a_hub_that_fails_half_the_uploads(server: HubServer, tmp_path: Path, tokenizer,
                                                  caplog) -> None:
    """Half of all requests fail at random (5xx, 429, dropped connections; retries absorb most), and
    on top of that every other save's push fails outright (5 x 503 in a row: a request out of retries)."""
    server.upload_fault_rate(0.5, seed=1)
    folder = tmp_path / "out"
    pusher = HubPusher(REPO, tmp_path / "staging")
    with caplog.at_level(logging.INFO, logger="minicodeparrot.training.hub_push"):
        for step in range(1, 7):
            state = save(folder, step, tokenizer)
            if step % 2:
                server.upload_faults.extend([("status", 503)] * hub.RETRY.attempts)
            pusher.push(step, folder)
            time.sleep(0.05)  # the steps between two saves
        assert pusher.close() == []
    failed = sum("failed" in r.getMessage() for r in caplog.records)
    requests = sum(m in ("POST", "PUT") for m, _, _ in server.log)
    print(f"{server.random_upload_faults} of {requests} requests failed at random, {failed} pushes failed, "
          f"{len(server.commits[REPO])} commits: {[c['summary'] for c in server.commits[REPO]]}")
    drawn = requests - 3 * hub.RETRY.attempts  # the requests that met no queued 503
    assert server.random_upload_faults > 0.3 * drawn and failed >= 3
    # Every step is on the Hub: in its own commit, or named in the commit that carried it.
    assert covered_steps(server) == [1, 2, 3, 4, 5, 6]
    assert sorted(pusher.pushed) == [1, 2, 3, 4, 5, 6]
    assert server.commits[REPO][-1]["summary"].startswith("step 6")
    root = server.upload_dir / REPO
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()} == state
    assert [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5, 6]
    assert not any((tmp_path / "staging").iterdir())  # pushed snapshots are cleaned up
    assert GPT.from_pretrained(REPO).config.n_embd == 16  # and the last one loads by its Hub id


def test_failed_pushes_ride_on_the_next_save(server: HubServer, tmp_path: Path, tokenizer, caplog) -> None:
    folder = tmp_path / "out"
    pusher = HubPusher(REPO, tmp_path / "staging")
    states = {}
    states[1] = save(folder, 1, tokenizer)
    pusher.push(1, folder)
    states[2] = save(folder, 2, tokenizer)  # overwrites step 1's files at once: the push has its own copy
    deadline = time.time() + 30
    while not pusher.commits and time.time() < deadline:
        time.sleep(0.01)
    assert server.commits[REPO][0]["summary"] == "step 1"
    assert server.commits[REPO][0]["files"]["model.safetensors"] == states[1]["model.safetensors"]
    server.upload_faults.extend([("status", 503)] * 5)  # the Hub is down for the next push's retries
    with caplog.at_level(logging.WARNING, logger="minicodeparrot.training.hub_push"):
        pusher.push(2, folder)
        deadline = time.time() + 30
        while "failed" not in caplog.text and time.time() < deadline:
            time.sleep(0.01)
        assert "hub push of step 2 to me/run failed (HubUnreachable" in caplog.text
        assert "retried with the next save" in caplog.text
    states[3] = save(folder, 3, tokenizer)
    pusher.push(3, folder)
    assert pusher.close() == []
    assert [c["summary"] for c in server.commits[REPO]] == ["step 1", "step 3 (also covers step 2)"]
    assert server.commits[REPO][1]["files"]["model.safetensors"] == states[3]["model.safetensors"]


def test_push_returns_at_once(server: HubServer, tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "out"
    save(folder, 1, tokenizer)
    server.upload_faults.append(("slow", 1.0))
    pusher = HubPusher(REPO, tmp_path / "staging")
    start = time.perf_counter()
    pusher.push(1, folder)
    took = time.perf_counter() - start
    assert took < 0.5 and not pusher.commits  # only the copy; the upload waits on the slow Hub
    pusher.close()
    assert pusher.commits == ["step 1"]


def test_rejected_token_never_crashes_training(server: HubServer, tmp_path: Path, tokenizer, monkeypatch,
                                               caplog) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    folder = tmp_path / "out"
    pusher = HubPusher(REPO, tmp_path / "staging", final_tries=2)
    with caplog.at_level(logging.WARNING, logger="minicodeparrot.training.hub_push"):
        for step in (10, 20):
            save(folder, step, tokenizer)
            pusher.push(step, folder)
        assert pusher.close() == [10, 20]
    assert "HTTP 401" in caplog.text
    snapshot = tmp_path / "staging" / "step_20"
    lost = f"step 20 (also covers step 10) never reached me/run; its files are kept in {snapshot}"
    assert lost in caplog.text
    assert f"minicodeparrot upload {snapshot} me/run" in caplog.text
    assert (snapshot / "model.safetensors").is_file()  # nothing lost: the last state waits on disk
    assert server.commits == {}


def test_close_retries_a_failed_last_push(server: HubServer, tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "out"
    state = save(folder, 7, tokenizer)
    server.upload_faults.extend([("status", 503)] * hub.RETRY.attempts)  # the last push fails...
    pusher = HubPusher(REPO, tmp_path / "staging")
    pusher.push(7, folder)
    assert pusher.close() == []  # ...and the final push at close() delivers it
    assert [c["summary"] for c in server.commits[REPO]] == ["step 7"]
    assert server.commits[REPO][0]["files"] == state
