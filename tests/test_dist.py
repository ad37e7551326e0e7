"""Process groups under torchrun restarts: a dead trainer is replaced and the run finishes bit-exactly.

torchrun keeps its key-value store across restarts, so each attempt's process group must use a namespace of
its own (minicodeparrot.dist._attempt_store). The runs here SIGKILL one trainer process only (not its
agent) after a checkpoint, as a crashed rank would die; torchrun then restarts the worker group, which
resumes from `--resume-from-checkpoint latest`. The last two tests change the membership of a
`--nnodes=1:2` job: a whole node leaves and the other goes on alone, or a node joins and the two go on
together, always with the same global batches. CPU, gloo, one thread per process (the machine has 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from minicodeparrot.dist import _attempt_store
from minicodeparrot.training.checkpoint import list_checkpoints, read_trainer_state

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"
STEPS, EVERY = 24, 8  # checkpoints at 8, 16, 24; the kill comes right after the first


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Train and validation shards of 32 stdlib modules, a 280-token BPE, a 2-layer 32-wide GPT with
    dropout (so a resume must restore every rank's RNG too)."""
    from conftest import stdlib_py_files

    from minicodeparrot.sources.corpus import make_corpus
    from minicodeparrot.sources.shards import iter_texts
    from minicodeparrot.tokenizer.trainer import BYTE_LEVEL_ALPHABET, train_bpe

    root = tmp_path_factory.mktemp("restarts")
    src = root / "src"
    src.mkdir()
    for f in stdlib_py_files(limit=32, min_bytes=2048, max_bytes=40_000):
        shutil.copy(f, src / f"{len(list(src.iterdir()))}_{f.name}")
    make_corpus(root / "corpus", sources=[src], samples_per_file=8, validation_fraction=0.15,
                show_progress=False)
    tok = train_bpe(list(iter_texts(root / "corpus" / "train")), 280, initial_alphabet=BYTE_LEVEL_ALPHABET,
                    show_progress=False)
    tok.save_pretrained(root / "tok")
    (root / "model.json").write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
                                                 "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1}))
    return {"tok": root / "tok", "train": root / "corpus" / "train", "valid": root / "corpus" / "valid",
            "model": root / "model.json"}


def _train_args(work: dict, out: Path) -> list[str]:
    return ["-m", "minicodeparrot", "train", "--preset", "tiny", "--model-config", str(work["model"]),
            "--tokenizer", str(work["tok"]), "--dataset-name-train", str(work["train"]),
            "--dataset-name-valid", str(work["valid"]), "--output-dir", str(out), "--seq-length", "32",
            "--train-batch-size", "4", "--valid-batch-size", "4", "--max-eval-steps", "1",
            "--num-warmup-steps", "2", "--record-shuffle-buffer", "8", "--sequence-shuffle-buffer", "8",
            "--max-train-steps", str(STEPS), "--save-checkpoint-steps", str(EVERY), "--data-workers", "0",
            "--no-progress", "--resume-from-checkpoint", "latest"]


def _torchrun(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--max-restarts=1",
            "--monitor-interval=0.1", *launch]


def _losses(out: Path) -> dict[int, float]:
    """Train loss by step; a step logged twice (re-run after the restart) keeps its last value."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d["loss"] for d in map(json.loads, lines) if "loss" in d}


def _trainer_of(agent: int) -> int:
    """The pid of the trainer torchrun's agent `agent` runs (its child running minicodeparrot)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if ppid == agent and b"minicodeparrot" in cmd:
            return int(entry)
    raise AssertionError(f"torchrun agent {agent} runs no trainer")


def _kill_after_first_checkpoint(out: Path, agent: subprocess.Popen, others: list[subprocess.Popen]) -> None:
    """SIGKILL `agent`'s trainer once step_8 is complete, after leaving a half-written later checkpoint
    (a crash mid-save) that the restart must not resume from."""
    deadline = time.time() + 120
    while not (out / f"step_{EVERY}").exists():
        assert time.time() < deadline and all(p.poll() is None for p in [agent, *others]), "no checkpoint"
        time.sleep(0.005)  # a tiny model's step takes ~30 ms
    half = out / "step_12.tmp"  # not a step it saves at: nothing overwrites it
    half.mkdir()
    shutil.copy(out / f"step_{EVERY}" / "trainer_state.pt", half / "trainer_state.pt")  # and no model.pt
    os.kill(_trainer_of(agent.pid), signal.SIGKILL)


def _check(ref: Path, cut: Path, logs: str) -> None:
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert resumed and all(f"{cut}/step_" in line for line in resumed), logs[-3000:]
    step = int(resumed[0].split(f"{cut}/step_")[1].split()[0])
    assert EVERY <= step < STEPS  # killed mid-run, resumed from a complete checkpoint, not step_12.tmp
    assert _losses(cut) == _losses(ref)  # every step, bit for bit
    assert sorted(_losses(cut)) == list(range(1, STEPS + 1))
    assert (cut / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (cut / "step_12.tmp").is_dir() and f"step_{STEPS}" in [p.name for p in list_checkpoints(cut)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _attempt(ranks: list[int], world: int, delay: float = 0.0) -> list[dist.Store]:
    """Run `_attempt_store` for `ranks` concurrently (one thread each, `delay` s apart) as one attempt's
    workers would; the stores they got, in rank order."""
    got: dict[int, dist.Store] = {}

    def worker(rank: int) -> None:
        got[rank] = _attempt_store(rank, world)

    threads = []
    for rank in ranks:
        threads.append(threading.Thread(target=worker, args=(rank,), daemon=True))
        threads[-1].start()
        time.sleep(delay)
    for t in threads:
        t.join(timeout=20)
    assert sorted(got) == sorted(ranks), "the attempt's ranks never agreed"
    return [got[r] for r in sorted(got)]


def _same_namespace(a: dist.Store, b: dist.Store) -> bool:
    key = f"probe{time.monotonic_ns()}"
    a.set(key, "1")
    return b.check([key])


def test_every_rank_of_an_attempt_gets_the_same_fresh_namespace(monkeypatch):
    """Agreement survives what a plain per-rank counter does not: a rank of an earlier attempt that died
    halfway through joining (its agent's other workers never arrived), then rank 0 arriving first and
    finding only the dead rank's leftovers."""
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    first = _attempt([0, 1], 2)
    assert _same_namespace(*first)
    # A rank 1 that starts joining and is SIGKILLed before any rank 0 of its attempt shows up.
    ghost = subprocess.Popen([sys.executable, "-c", "from minicodeparrot.dist import _attempt_store; "
                              "print('joining', flush=True); _attempt_store(1, 2)"],
                             env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             stdout=subprocess.PIPE, text=True)
    assert ghost.stdout.readline() == "joining\n"
    time.sleep(1.0)
    ghost.kill()
    ghost.wait()
    later = _attempt([0, 1], 2, delay=0.5)  # rank 0 first: it meets the dead rank's leftovers
    assert _same_namespace(*later)
    assert not _same_namespace(first[0], later[0]) and not _same_namespace(later[1], first[1])
    again = _attempt([1, 0], 2, delay=0.5)  # and rank 1 first
    assert _same_namespace(*again) and not _same_namespace(again[0], later[0])
    del server


@pytest.mark.slow
def test_restart_after_sigkill_resumes_bit_exactly(work, tmp_path):
    """One process: the restarted trainer resumes from step_8, not from the half-written step_12.tmp. (A
    one-rank group has no peer to misdial; the stale-address failure needs two ranks, as in the next test.)"""
    launch = ["--standalone"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    full = subprocess.run([*_torchrun(*launch), *_train_args(work, ref)], env=ENV, capture_output=True,
                          text=True, timeout=150)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen([*_torchrun(*launch), *_train_args(work, cut)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _kill_after_first_checkpoint(cut, proc, [])
        logs, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, logs[-3000:]
    _check(ref, cut, logs)


@pytest.mark.slow
def test_two_nodes_restart_when_one_nodes_trainer_dies(work, tmp_path):
    """Two torchrun agents (simulated nodes) meet through a c10d rendezvous on loopback. Only node B's
    trainer dies: node B's agent counts a restart, node A's restarts its trainer without counting one
    (TORCHELASTIC_RESTART_COUNT differs between the nodes, pytorch issue 108158), and the new group forms."""
    def launch(out: Path, port: int) -> list[subprocess.Popen]:
        rdzv = _torchrun("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                         "--rdzv-id=restarts")
        return [subprocess.Popen([*rdzv, *_train_args(work, out)], env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for _ in range(2)]

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    nodes = launch(ref, _free_port()) + launch(cut, _free_port())
    try:
        _kill_after_first_checkpoint(cut, nodes[3], [nodes[2]])
        logs = [p.communicate(timeout=150)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0, 0, 0], "\n".join(log[-2000:] for log in logs)
    _check(ref, cut, logs[2] + logs[3])


# --- membership: nodes leave and join a --nnodes=1:2 job --------------------------------------------------
# After a node dies, the survivor's agent waits until the rendezvous declares it dead (no heartbeat for
# keep_alive_interval x keep_alive_max_attempt seconds), then last_call_timeout more for latecomers, and then
# starts a round with the nodes it has. The defaults (5 s x 3, 30 s) would add 45 s to each test.
ELASTIC = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2"
# torch 2.13 shares the agent's TCPStore with the workers, and the agent of rank 0 publishes its address to a
# round only when it first becomes rank 0: a node that joins later waits for it in vain (60 s, then fails).
# With the sharing off, rank 0 publishes a fresh address every round (scripts/launch_multi_node.sh does this).
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _record(out: Path) -> dict[int, tuple[float, int]]:
    """(loss, batch_hash) by step; a step logged twice (re-run after the restart) keeps its last line."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: (d["loss"], d["batch_hash"]) for d in map(json.loads, lines) if "loss" in d}


def _no_dropout(work: dict, tmp_path: Path) -> dict:
    """The work fixture with a model without dropout: one rank draws other masks than two did."""
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
                                 "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}))
    return {**work, "model": model}


def _elastic_node(data: dict, out: Path, port: int, host: bool, log: Path, *extra: str) -> subprocess.Popen:
    """One node of a `--nnodes=1:2` job on loopback; `host`: it holds the rendezvous store, as a real job's
    --rdzv-endpoint node does (both nodes would think so on loopback). Its output goes to `log`."""
    cmd = [*_torchrun("--nnodes=1:2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                      "--rdzv-id=membership", f"--rdzv-conf={ELASTIC},is_host={int(host)}"),
           *_train_args(data, out), *extra]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env={**ENV, **NO_SHARED_STORE, "LOGLEVEL": "INFO"}, stdout=f,
                                stderr=subprocess.STDOUT)


def _reference(data: dict, out: Path, ranks: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={ranks}", *_train_args(data, out), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(text: str, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while text not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, f"no {text!r} in {log}"
        time.sleep(0.02)


def _check_same_batches(ref: Path, cut: Path, logs: str, worlds: list[str], world: int) -> None:
    """The torchrun agent's rounds had `worlds` nodes, the run resumed once, and every step saw the reference
    run's global batch (batch_hash) with its loss up to float summation order."""
    assert [line.split("=")[1] for line in logs.splitlines() if "group_world_size=" in line] == worlds, logs
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and EVERY <= int(resumed[0].split(f"{cut}/step_")[1].split()[0]) < STEPS, logs
    got, want = _record(cut), _record(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert [got[s][1] for s in got] == [want[s][1] for s in got]  # the same sequences in every step
    assert max(abs(got[s][0] - want[s][0]) for s in got) < 1e-3
    assert read_trainer_state(cut / f"step_{STEPS}")["world_size"] == world


@pytest.mark.slow
def test_a_node_leaves_and_the_other_finishes_with_the_same_global_batches(work, tmp_path):
    """Node B (its agent and its trainer) is SIGKILLed after the first checkpoint. Node A's trainer fails on
    its next collective, its agent forms a new round alone, and its one process resumes the 2-rank run with
    twice the gradient accumulation. Node A hosts the rendezvous: the store dies with its host."""
    data, ref, cut, port = _no_dropout(work, tmp_path), tmp_path / "ref", tmp_path / "cut", _free_port()
    a = _elastic_node(data, cut, port, True, tmp_path / "a.log")
    b = _elastic_node(data, cut, port, False, tmp_path / "b.log")
    reference = None
    try:
        deadline = time.time() + 120
        while not (cut / f"step_{EVERY}").exists():
            assert time.time() < deadline and a.poll() is None and b.poll() is None, "no checkpoint"
            time.sleep(0.005)
        trainer = _trainer_of(b.pid)
        b.kill()  # the agent first: it must not see its trainer die and restart it
        os.killpg(trainer, signal.SIGKILL)  # torchrun starts each trainer in a session of its own
        b.wait(timeout=30)
        # The uninterrupted 2-rank run starts only now, while node A recovers: started with the nodes it
        # would slow their start on 2 cores, and node B might then join after node A's last call.
        reference = _reference(data, ref, 2)
        a.wait(timeout=150)
        ref_logs = reference.communicate(timeout=150)[0]
    finally:
        for p in (a, b, reference):
            if p is not None:
                p.kill()
    logs = (tmp_path / "a.log").read_text()
    assert reference.returncode == 0, ref_logs[-3000:]
    assert a.returncode == 0, logs[-3000:]
    _check_same_batches(ref, cut, logs, ["2", "1"], world=1)


@pytest.mark.slow
def test_a_node_joins_and_the_bigger_group_continues_with_the_same_global_batches(work, tmp_path):
    """Node A runs alone (a global batch of 8: 4 sequences x 2 micro-batches); node B starts after the first
    checkpoint. A's agent sees it waiting and stops its trainer with SIGTERM (it saves the step it is on),
    then both form a round and resume on 2 ranks without accumulation: nothing is lost or repeated."""
    data, ref, cut, port = _no_dropout(work, tmp_path), tmp_path / "ref", tmp_path / "cut", _free_port()
    accumulate = ("--gradient-accumulation-steps", "2")
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = _elastic_node(data, cut, port, True, a_log, *accumulate)
    b = reference = None
    try:
        deadline = time.time() + 120
        while not (cut / f"step_{EVERY}").exists():
            assert time.time() < deadline and a.poll() is None, "no checkpoint"
            time.sleep(0.005)
        trainer = _trainer_of(a.pid)
        os.kill(trainer, signal.SIGSTOP)  # the 24 steps would be over before node B has started
        b = _elastic_node(data, cut, port, False, b_log, *accumulate)
        _wait_for("new nodes from group_rank", a_log, a)  # A's agent has seen B and signalled its trainer
        os.kill(trainer, signal.SIGCONT)
        reference = _reference(data, ref, 1, *accumulate)
        a.wait(timeout=150)
        b.wait(timeout=150)
        ref_logs = reference.communicate(timeout=150)[0]
    finally:
        for p in (a, b, reference):
            if p is not None:
                p.kill()
    logs = a_log.read_text()
    assert reference.returncode == 0, ref_logs[-3000:]
    assert a.returncode == 0 and b.returncode == 0, logs[-3000:] + b_log.read_text()[-3000:]
    assert "stopped at step" in logs
    _check_same_batches(ref, cut, logs, ["1", "2"], world=2)
