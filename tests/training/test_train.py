"""The training loop: optimizer groups, schedule, DDP and accumulation maths, resume, signals.

Everything runs on CPU with a 2-layer, 32-wide GPT on a small standard-library corpus. Subprocess runs use
OMP_NUM_THREADS=1: the CI machine has 2 cores, and oversubscribed OpenMP threads slow tiny matmuls 10x.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP

from minicodeparrot.errors import UserError
from minicodeparrot.model.gpt import GPT, GPTConfig
from minicodeparrot.training import train as T
from minicodeparrot.training.checkpoint import list_checkpoints
from minicodeparrot.training.validation import evaluate_loss

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A corpus of 48 stdlib modules (train + validation shards), a 300-token BPE, a tiny model config."""
    from minicodeparrot.sources.corpus import make_corpus
    from minicodeparrot.sources.shards import iter_texts
    from minicodeparrot.tokenizer.trainer import BYTE_LEVEL_ALPHABET, train_bpe

    root = tmp_path_factory.mktemp("train")
    src = root / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(p for p in stdlib.glob("*.py") if 2048 <= p.stat().st_size <= 40_000)[:48]:
        shutil.copy(f, src / f.name)
    make_corpus(root / "corpus", sources=[src], samples_per_file=8, validation_fraction=0.15,
                show_progress=False)
    tok = train_bpe(list(iter_texts(root / "corpus" / "train")), 300, initial_alphabet=BYTE_LEVEL_ALPHABET,
                    show_progress=False)
    tok.save_pretrained(root / "tok")
    dropout = {"embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1}  # so resume must restore the RNG
    (root / "model.json").write_text(json.dumps({**TINY, **dropout}))
    return {"root": root, "tok": root / "tok", "train": root / "corpus" / "train",
            "valid": root / "corpus" / "valid", "model": root / "model.json"}


def _args(work: dict, out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--model-config", str(work["model"]), "--tokenizer", str(work["tok"]),
            "--dataset-name-train", str(work["train"]), "--dataset-name-valid", str(work["valid"]),
            "--output-dir", str(out), "--seq-length", "32", "--train-batch-size", "4",
            "--valid-batch-size", "4", "--max-eval-steps", "2", "--num-warmup-steps", "2",
            "--record-shuffle-buffer", "8", "--sequence-shuffle-buffer", "8", "--no-progress", *extra]


def _metrics(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Train loss and eval loss by step; a step logged twice (re-run after a resume) keeps its last value."""
    train, evals = {}, {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "loss" in d:
            train[d["step"]] = d["loss"]
        else:
            evals[d["step"]] = d["eval_loss"]
    return train, evals


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_gpt(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout, **TINY))


# --- optimizer groups and schedule --------------------------------------------------------------------------
def test_decay_groups_are_exactly_biases_and_layernorm_gains():
    model = _tiny_gpt()
    decay, no_decay = T.decay_parameter_names(model)
    blocks = [f"transformer.h.{i}." for i in range(2)]
    assert set(decay) == {"transformer.wte.weight", "transformer.wpe.weight"} | {
        b + n for b in blocks for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                        "mlp.c_proj.weight")}
    assert set(no_decay) == {"transformer.ln_f.weight", "transformer.ln_f.bias"} | {
        b + n for b in blocks for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                        "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias",
                                        "mlp.c_proj.bias")}
    # The book's list matches the biases but none of GPT-2's LayerNorm gains.
    book = [n for n in decay + no_decay if any(k in n for k in ["bias", "LayerNorm.weight"])]
    assert not any(n.endswith("ln_1.weight") for n in book)
    opt = T.make_optimizer(model, 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())  # tied lm_head counted once, nothing missing


def test_decay_groups_match_transformers_gpt2_names():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64)
    hf = transformers.GPT2LMHeadModel(cfg)
    decay, no_decay = T.decay_parameter_names(hf)
    ln = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {f"{m}.weight" for m in ln} <= set(no_decay)
    assert all(n.endswith("bias") or n.rsplit(".", 1)[0] in ln for n in no_decay)
    assert all(p.dim() == 2 for n, p in hf.named_parameters() if n in decay)


def test_lr_schedule_warmup_then_cosine_to_zero():
    f = T.lr_factor
    assert f(0, 10, 100) == 0.0
    assert f(5, 10, 100) == 0.5
    assert f(10, 10, 100) == 1.0  # warmup end: the peak
    assert f(55, 10, 100) == pytest.approx(0.5)  # half-way through the decay
    assert f(100, 10, 100) == pytest.approx(0.0, abs=1e-12)  # the end
    assert f(55, 10, 100, "linear") == pytest.approx(0.5)
    assert f(90, 10, 100, "constant") == 1.0
    # Through the real scheduler: lr used at optimizer step s (1-based) is factor(s - 1) * peak.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = T.make_scheduler(opt, warmup=10, total=100, kind="cosine")
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[10] == pytest.approx(2e-4) and max(lrs) == pytest.approx(2e-4)
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments_are_one_line_errors(work, tmp_path, capsys):
    from minicodeparrot.cli import main

    for flag, value, expect in [("--train-batch-size", "0", "--train-batch-size must be at least 1"),
                                ("--num-warmup-steps", "500", "--num-warmup-steps must be in"),
                                ("--max-eval-steps", "0", "--max-eval-steps must be")]:
        with pytest.raises(SystemExit) as e:
            main(["train", *_args(work, tmp_path / "o", "--max-train-steps", "10"), flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="neither an architecture"):
        T.build_model("no-such-config", 100, 32)


# --- gradient maths ------------------------------------------------------------------------------------
def _batches(n: int, b: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (b, 16), generator=g) for _ in range(n)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_k_times_b_equals_batch_k_b():
    micro = _batches(3, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    off = torch.autocast("cpu", enabled=False)
    a, b = _tiny_gpt(), _tiny_gpt()
    loss_a = T.accumulate_gradients(a, micro, off, scaler)
    loss_b = T.accumulate_gradients(b, [torch.cat(micro)], off, scaler)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    ga, gb = _grads(a), _grads(b)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    micro = _batches(4, 2)  # global batch: 4 micro-batches of 2; rank r takes micro-batches r and r+2
    model = DDP(_tiny_gpt(seed=rank))  # different init per rank: DDP must broadcast rank 0's weights
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = dist.all_reduce(bucket.buffer() / world, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting_hook)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    off = torch.autocast("cpu", enabled=False)
    T.accumulate_gradients(model, micro[rank::world], off, scaler)
    n_accum = len(calls)
    model.zero_grad()
    calls.clear()
    T.accumulate_gradients(model, [micro[rank]], off, scaler)
    # Evaluation over uneven shares: rank 0 holds 3 sequences, rank 1 one.
    data = torch.cat(_batches(1, 4, seed=7))
    mine = [data[:3]] if rank == 0 else [data[3:]]
    eval_loss = evaluate_loss(model.module, iter(mine), autocast=off)["loss"]
    if rank == 0:
        torch.save({"calls_accum": n_accum, "calls_single": len(calls), "eval": eval_loss}, out)
    model.zero_grad()
    T.accumulate_gradients(model, micro[rank::world], off, scaler)
    if rank == 0:
        torch.save({**torch.load(out), "grads": _grads(model.module)}, out)
    # Tear down in order: both ranks done, then the DDP reducer (it holds the process group), then the
    # group. Destroying the group under a live reducer, or while the peer is still mid-collective, can
    # abort the process in gloo's C++ teardown ("terminate called without an active exception").
    dist.barrier()
    del model
    dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    # no_sync covered forward and backward: one all-reduce per bucket per optimizer step, not per micro-step.
    assert res["calls_accum"] == res["calls_single"] >= 1
    single = _tiny_gpt(seed=0)
    T.accumulate_gradients(single, _batches(4, 2), torch.autocast("cpu", enabled=False),
                           torch.amp.GradScaler("cpu", enabled=False))
    ref = _grads(single)
    for n, g in res["grads"].items():
        torch.testing.assert_close(g, ref[n], rtol=1e-5, atol=1e-7)
    data = torch.cat(_batches(1, 4, seed=7))
    ref_eval = evaluate_loss(_tiny_gpt(seed=0), iter([data]))["loss"]
    assert res["eval"] == pytest.approx(ref_eval, rel=1e-6)


def _lonely_barrier_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from datetime import timedelta

    from minicodeparrot.dist import barrier, setup_distributed

    setup_distributed(timeout=timedelta(seconds=2))
    if rank == 0:
        t = time.time()
        try:
            barrier()
        except RuntimeError as e:
            Path(out).write_text(f"{time.time() - t} {e}")
    else:  # never joins the barrier; stays alive (a hung rank, not a dead one) until rank 0 has given up
        deadline = time.time() + 120
        while not Path(out).exists() and time.time() < deadline:
            time.sleep(0.1)
    os._exit(0)  # no teardown: the group is broken on purpose


def test_dist_timeout_ends_a_collective_that_waits_too_long(tmp_path):
    """--dist-timeout reaches the process group: a collective a rank never joins fails after it."""
    out = tmp_path / "waited.txt"
    mp.spawn(_lonely_barrier_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    waited = float(out.read_text().split()[0])
    assert 1.5 < waited < 60, out.read_text()  # torch's default would wait 30 minutes


def _compiled_ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    class SmallBucketDDP(DDP):  # several gradient buckets even for a tiny model, as a real one has
        def __init__(self, module, **kw):
            super().__init__(module, bucket_cap_mb=0.02, **kw)

    dist._DEFAULT_FIRST_BUCKET_BYTES = 16_000  # DDP and dynamo: the first bucket is the smallest

    graphs = []

    def counting_backend(gm, example_inputs):  # called once per graph dynamo hands to the compiler
        graphs.append(len(list(gm.graph.nodes)))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    T.DDP = SmallBucketDDP
    di = T.DistInfo(rank, 0, world, torch.device("cpu"))
    micro = _batches(4, 2)[rank::world]
    off, scaler = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    grads = {}
    real_compile = torch.compile
    for name, compile in (("eager", False), ("compiled", True)):
        torch.compile = lambda m, **k: real_compile(m, backend=counting_backend)
        try:
            model = T.wrap_model(_tiny_gpt(seed=0, dropout=0.0), di, compile)
        finally:
            torch.compile = real_compile
        T.accumulate_gradients(model, micro, off, scaler)
        grads[name] = _grads(T.unwrap(model))
        dist.barrier()
        del model
    if rank == 0:
        torch.save({"grads": grads, "graphs": len(graphs)}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_compiled_ddp_splits_at_buckets_and_gives_eager_gradients(tmp_path):
    """DDP is wrapped before torch.compile, so dynamo splits the graph at DDP's bucket boundaries (each
    bucket's all-reduce can then start during backward) and the gradients stay those of eager DDP."""
    out = tmp_path / "compiled.pt"
    mp.spawn(_compiled_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert res["graphs"] > 1  # compiled-then-wrapped would be one graph, all-reducing only at its end
    for n, g in res["grads"]["eager"].items():
        torch.testing.assert_close(res["grads"]["compiled"][n], g, rtol=1e-5, atol=1e-7)


def test_zero_gives_ddp_losses_and_resumes_exactly(work, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "minicodeparrot", "train"]
    common = ("--max-train-steps", "6", "--save-checkpoint-steps", "3", "--max-eval-steps", "1")
    runs = {"ddp": (), "zero": ("--zero",)}
    for name, extra in runs.items():
        r = subprocess.run([*torchrun, *_args(work, tmp_path / name, *common, *extra)], env=ENV,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
    ddp, zero = _metrics(tmp_path / "ddp")[0], _metrics(tmp_path / "zero")[0]
    assert zero == ddp  # the same AdamW arithmetic, each rank on its own slice of the parameters
    step3 = tmp_path / "zero" / "step_3"
    assert sorted(p.name for p in step3.glob("optimizer*")) == ["optimizer_rank0.pt", "optimizer_rank1.pt"]
    shutil.copytree(step3, tmp_path / "resumed" / "step_3")
    r = subprocess.run([*torchrun, *_args(work, tmp_path / "resumed", *common, "--zero",
                                          "--resume-from-checkpoint", "latest")],
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _metrics(tmp_path / "resumed")[0]
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: zero[s] for s in (4, 5, 6)}  # bitwise
    # Without --zero the shards are put back together into plain AdamW's state: the same numbers again.
    shutil.copytree(step3, tmp_path / "unsharded" / "step_3")
    r = subprocess.run([*torchrun, *_args(work, tmp_path / "unsharded", *common,
                                          "--resume-from-checkpoint", "latest")],
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    unsharded = _metrics(tmp_path / "unsharded")[0]
    assert {s: unsharded[s] for s in (4, 5, 6)} == {s: zero[s] for s in (4, 5, 6)}


# --- whole runs ----------------------------------------------------------------------------------------
def test_torchrun_two_ranks_learns(work, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minicodeparrot", "train", *_args(work, out, "--max-train-steps", "30",
                                                "--save-checkpoint-steps", "15")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    losses, evals = _metrics(out)
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(26, 31)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, (first, last)
    assert set(evals) == {15, 30} and evals[30] < evals[15]
    # Each rank logged the token sum of its first sequence: different data on the two ranks.
    sums = []
    for rank in range(2):
        text = (out / "log" / f"debug_{rank}.log").read_text()
        sums.append(text.split("first sequence sums to ")[1].split()[0])
    assert sums[0] != sums[1]
    assert torch.load(out / "step_30" / "trainer_state.pt", weights_only=True)["world_size"] == 2
    for rank in range(2):  # every rank wrote its own data and RNG state; nothing was gathered
        assert set(torch.load(out / "step_30" / f"rank_{rank}.pt", weights_only=True)) == {"data", "rng"}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def _process_tree(root: int) -> list[int]:
    """`root` and every process below it (torchrun's trainers run in sessions of their own, and their data
    workers in theirs, so a process group or session would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(root: int) -> list[int]:
    """SIGKILL the run's whole process tree at once, as a crashed node would lose it."""
    tree = _process_tree(root)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


@pytest.mark.parametrize("launcher,workers,packing", [
    ("one", 0, "concat"), ("one", 1, "concat"), ("one", 2, "concat"), ("torchrun", 0, "concat"),
    ("torchrun", 1, "concat"), ("torchrun", 2, "concat"), ("one", 1, "per-file")])
def test_sigkill_and_resume_is_bitwise_identical(work, tmp_path, launcher, workers, packing):
    """Kill -9 the whole run (every process of its session) after a checkpoint; resuming gives the
    uninterrupted run's losses bit for bit, with the data workers' pipelines restored exactly."""
    cmd = [sys.executable, "-m", "minicodeparrot", "train"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "minicodeparrot", "train"]
    common = ("--max-train-steps", "12", "--save-checkpoint-steps", "4", "--keep-last", "2",
              "--max-eval-steps", "1", "--data-workers", str(workers), "--packing", packing)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    full = subprocess.run([*cmd, *_args(work, ref, *common)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen([*cmd, *_args(work, cut, *common)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not (cut / "step_4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    tree = _kill_tree(proc.pid)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert len(tree) >= 1 + workers * (2 if launcher == "torchrun" else 1)
    time.sleep(1)
    assert not [pid for pid in tree if _alive(pid)]  # nothing of the run outlived it
    resumed_from = max(int(p.name.split("_")[1]) for p in list_checkpoints(cut))
    assert resumed_from < 12
    again = subprocess.run([*cmd, *_args(work, cut, *common, "--resume-from-checkpoint", "latest")],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {cut / f'step_{resumed_from}'}" in again.stderr, again.stderr[-3000:]

    ref_loss, ref_eval = _metrics(ref)
    cut_loss, cut_eval = _metrics(cut)
    for s in range(resumed_from + 1, 13):
        assert cut_loss[s] == ref_loss[s], s  # bitwise, not approx
    assert cut_eval == ref_eval
    assert (cut / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert [p.name for p in list_checkpoints(cut)] == ["step_8", "step_12"]  # --keep-last 2


def test_resuming_with_other_data_workers_is_exact(work, tmp_path):
    """The data state is kept per stream, not per worker: 2 workers' checkpoint continues bit for bit
    with 1 (and the uninterrupted run used 3)."""
    cmd = [sys.executable, "-m", "minicodeparrot", "train"]
    common = ("--max-train-steps", "4", "--save-checkpoint-steps", "2", "--max-eval-steps", "1")
    ref = subprocess.run([*cmd, *_args(work, tmp_path / "ref", *common, "--data-workers", "3")],
                         env=ENV, capture_output=True, text=True, timeout=200)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "w"
    first = subprocess.run([*cmd, *_args(work, out, *common, "--max-train-steps", "2",
                                         "--data-workers", "2")],
                           env=ENV, capture_output=True, text=True, timeout=200)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*cmd, *_args(work, out, *common, "--data-workers", "1",
                                         "--resume-from-checkpoint", "latest")],
                           env=ENV, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _metrics(out)[0] == _metrics(tmp_path / "ref")[0]


def test_sigterm_checkpoints_and_exits_zero(work, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "minicodeparrot", "train",
                             *_args(work, out, "--max-train-steps", "1000",
                                    "--save-checkpoint-steps", "1000")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 200
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in err
    last_step = max(_metrics(out)[0])
    assert [p.name for p in list_checkpoints(out)] == [f"step_{last_step}"]
    assert torch.load(out / f"step_{last_step}" / "trainer_state.pt", weights_only=True)["step"] == last_step


def test_torchrun_sigterm_checkpoints_every_rank_and_resumes(work, tmp_path):
    # torchrun forwards SIGTERM to each worker, waits --shutdown-timeout (30 s) for them, then SIGKILLs.
    out = tmp_path / "ddp_term"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "minicodeparrot", "train"]
    common = ("--save-checkpoint-steps", "1000", "--max-eval-steps", "1")
    proc = subprocess.Popen([*torchrun, *_args(work, out, "--max-train-steps", "1000", *common)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # torchrun re-raises the signal as SignalException after its workers are gone: non-zero status...
    assert proc.returncode != 0 and "SignalException" in err, err[-3000:]
    # ...but the workers stopped by themselves, in time, at the same step, each after saying so.
    assert "forcefully exiting" not in err, err[-3000:]
    last_step = max(_metrics(out)[0])
    for rank in range(2):
        text = (out / "log" / f"debug_{rank}.log").read_text()
        assert "received SIGTERM" in text and f"stopped at step {last_step} by a signal" in text, text[-2000:]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{last_step}"]
    ckpt = out / f"step_{last_step}"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == last_step and state["world_size"] == 2
    ranks = [torch.load(ckpt / f"rank_{r}.pt", weights_only=True) for r in range(2)]
    data = [r["data"] for r in ranks]  # each rank's own streams: the position and shuffle buffer of each
    assert [sorted(d["streams"]) for d in data] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # 8 streams, dealt in turn
    buffers = [d["streams"][r]["sequences"]["items"] for r, d in enumerate(data)]
    assert buffers[0].dtype == torch.uint16 and buffers[0].shape == (2, 32)  # 8 per rank over 4 streams
    assert not torch.equal(buffers[0], buffers[1])  # different files per rank
    assert ranks[0]["rng"]["torch"].ne(ranks[1]["rng"]["torch"]).any()
    weights = torch.load(ckpt / "model.pt", weights_only=True)
    GPT(GPTConfig(vocab_size=weights["transformer.wte.weight"].shape[0], **TINY)).load_state_dict(weights)

    again = subprocess.run([*torchrun, *_args(work, out, "--max-train-steps", str(last_step + 2), *common,
                                              "--resume-from-checkpoint", "latest")],
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt} at step {last_step}" in again.stderr
    losses, _ = _metrics(out)
    assert max(losses) == last_step + 2 and all(math.isfinite(losses[s]) for s in losses)
    assert (out / "model.safetensors").is_file()


def test_repeated_sigterm_does_not_kill_a_stopping_run():
    # Under SLURM a worker gets SIGTERM from srun and again from torchrun: the second must not kill it.
    default, reached_default = signal.getsignal(signal.SIGTERM), []
    signal.signal(signal.SIGTERM, lambda *_: reached_default.append(1))  # stands in for "terminate"
    try:
        stop = T.StopRequest()
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes
        stop.restore()
        assert stop.requested and not reached_default
    finally:
        signal.signal(signal.SIGTERM, default)


def test_non_finite_loss_stops_naming_the_step_and_a_skipped_step_leaves_no_trace(work, tmp_path,
                                                                                   monkeypatch):
    from minicodeparrot.cli import build_parser

    real = T.accumulate_gradients
    calls = []

    def poisoned(model, *a, **k):
        loss = real(model, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # an overflow as it really happens: NaN loss *and* NaN gradients
            for p in T.unwrap(model).parameters():
                p.grad.fill_(math.nan)
            return loss * math.nan
        return loss

    monkeypatch.setattr(T, "accumulate_gradients", poisoned)
    args = build_parser().parse_args(["train", *_args(work, tmp_path / "nan", "--max-train-steps", "6")])
    with pytest.raises(T.NonFiniteLossError, match="loss is nan at step 3"):
        T.train(args)
    calls.clear()
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (steps.append(1), real_step(self))[1])
    args = build_parser().parse_args(["train", *_args(work, tmp_path / "skip", "--max-train-steps", "4",
                                                       "--max-bad-steps", "1")])
    result = T.train(args)
    # 5 batches taken, 4 updates: the bad step's NaN gradients reached neither the weights nor the next step.
    assert result["step"] == 4 and len(calls) == 5 and len(steps) == 4
    assert math.isfinite(result["loss"]) and math.isfinite(result["eval_loss"])
    losses, _ = _metrics(tmp_path / "skip")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("extra", [(), pytest.param(("--data-workers", "2"), marks=pytest.mark.slow),
                                   pytest.param(("--compile",), marks=pytest.mark.slow)],
                         ids=["eager", "data-workers", "compile"])
def test_one_host_device_sync_per_optimizer_step(work, tmp_path, monkeypatch, extra):
    """Count the calls that make the host wait for the device (.item, int(t), ...) in training/train.py and,
    on the consumer's side of the data workers, in data/loader.py."""
    from minicodeparrot.cli import build_parser
    from minicodeparrot.data import loader

    files = {T.__file__, loader.__file__}
    counts = {"n": 0}
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename in files:
                counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def run(steps: int) -> int:
        counts["n"] = 0
        argv = _args(work, tmp_path / f"s{steps}", "--max-train-steps", str(steps),
                     "--gradient-accumulation-steps", "2", "--save-checkpoint-steps", "1000", *extra)
        T.train(build_parser().parse_args(["train", *argv]))
        return counts["n"]

    # Both runs evaluate and checkpoint once, at the end: the difference is 4 steps' worth of syncs.
    assert run(7) - run(3) == 4


def test_preset_warmup_is_clamped_but_a_given_one_is_checked(work, tmp_path):
    from minicodeparrot.cli import build_parser

    argv = [a for a in _args(work, tmp_path / "w", "--max-train-steps", "3") if a != "--num-warmup-steps"]
    argv.remove("2")  # the value after --num-warmup-steps: the tiny preset's 30 steps apply
    from minicodeparrot.training.config import given_values, resolve_config

    args = build_parser().parse_args(["train", *argv])
    cfg, notes = resolve_config(given_values(args), args.preset)
    assert cfg.num_warmup_steps == 3 and "warming up over all 3 steps" in notes[0]
    with pytest.raises(UserError, match="--num-warmup-steps must be in"):
        args = build_parser().parse_args(["train", *argv, "--num-warmup-steps", "30"])
        resolve_config(given_values(args), args.preset)


def test_tokenized_shards_train(work, tmp_path):
    from minicodeparrot.cli import build_parser
    from minicodeparrot.data.pretokenize import pretokenize
    from minicodeparrot.tokenizer.bpe import Tokenizer

    tok = Tokenizer.from_pretrained(work["tok"])
    for split in ("train", "valid"):
        pretokenize(work[split], tok, tmp_path / split, show_progress=False)
    argv = _args(work, tmp_path / "out", "--max-train-steps", "4", "--save-checkpoint-steps", "2",
                 "--tokenized")
    argv[argv.index("--dataset-name-train") + 1] = str(tmp_path / "train")
    argv[argv.index("--dataset-name-valid") + 1] = str(tmp_path / "valid")
    result = T.train(build_parser().parse_args(["train", *argv]))
    assert result["step"] == 4 and math.isfinite(result["eval_loss"])
    state = torch.load(tmp_path / "out" / "step_4" / "rank_0.pt", weights_only=True)
    # 4 steps of 4 windows: one from each of the 4 streams per step (streams default to the global batch)
    assert [v["source"]["taken"] for v in state["data"]["streams"].values()] == [4, 4, 4, 4]


def test_tokenized_shards_from_another_tokenizer_are_a_one_line_error(work, tmp_path, capsys):
    from minicodeparrot.cli import main
    from minicodeparrot.data.pretokenize import pretokenize
    from minicodeparrot.sources.shards import iter_texts
    from minicodeparrot.tokenizer.trainer import BYTE_LEVEL_ALPHABET, train_bpe

    other = train_bpe(list(iter_texts(work["train"]))[:20], 280, initial_alphabet=BYTE_LEVEL_ALPHABET,
                      show_progress=False)
    for split in ("train", "valid"):
        pretokenize(work[split], other, tmp_path / split, show_progress=False)
    argv = _args(work, tmp_path / "out", "--max-train-steps", "2", "--tokenized")
    argv[argv.index("--dataset-name-train") + 1] = str(tmp_path / "train")
    argv[argv.index("--dataset-name-valid") + 1] = str(tmp_path / "valid")
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "tokenized with a vocabulary of 280 tokens but --tokenizer has 300" in errors[0]


def test_unigram_baseline_is_the_entropy_of_token_frequencies():
    from minicodeparrot.demo import unigram_entropy

    assert unigram_entropy([[1, 2], [3, 4]]) == pytest.approx(math.log(4))
    assert unigram_entropy([[7, 7, 7]]) == 0.0
    p = [0.5, 0.25, 0.25]
    assert unigram_entropy([[0, 0, 1, 2]]) == pytest.approx(-sum(x * math.log(x) for x in p))


def test_max_grad_norm_bounds_the_first_update(work, tmp_path):
    """A tiny clip norm shrinks every gradient to a few times AdamW's eps, so step 1 barely moves the
    weights; with the default 1.0 the same step moves them by about the learning rate."""
    from minicodeparrot.cli import build_parser
    from minicodeparrot.model.gpt import GPT

    before = _initial_weights(work, tmp_path / "init")
    moved = {}
    for norm in ("1.0", "1e-9"):
        out = tmp_path / f"n{norm}"
        argv = _args(work, out, "--max-train-steps", "1", "--num-warmup-steps", "0", "--max-grad-norm", norm)
        T.train(build_parser().parse_args(["train", *argv]))
        after = GPT.from_pretrained(out).state_dict()
        moved[norm] = max((after[k].float() - before[k].float()).abs().max().item() for k in after)
    assert moved["1.0"] > 1e-3 and moved["1e-9"] < moved["1.0"] / 10


def _initial_weights(work, out) -> dict:
    """The weights the run starts from: the seeded model, before any step."""
    from minicodeparrot.cli import build_parser
    from minicodeparrot.dist import DistInfo
    from minicodeparrot.tokenizer.bpe import Tokenizer
    from minicodeparrot.training.config import given_values, resolve_config

    args = build_parser().parse_args(["train", *_args(work, out)])
    cfg, _ = resolve_config(given_values(args), args.preset)
    model, _ = T.build_model_and_optimizer(cfg, DistInfo(0, 0, 1, torch.device("cpu")),
                                           Tokenizer.from_pretrained(work["tok"]))
    return model.state_dict()


def test_run_records_its_config_and_environment(work, tmp_path):
    import importlib.metadata

    from minicodeparrot.cli import build_parser

    out = tmp_path / "env"
    T.train(build_parser().parse_args(["train", *_args(work, out, "--max-train-steps", "2")]))
    recorded = json.loads((out / "train_args.json").read_text())
    assert recorded["max_train_steps"] == 2 and recorded["seq_length"] == 32 and recorded["progress"] is False
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    assert env["world_size"] == 1 and env["devices"]
    assert env["git_commit"] is None or len(env["git_commit"]) == 40


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _hashes(out: Path) -> dict[int, int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d["batch_hash"] for d in map(json.loads, lines) if "batch_hash" in d}


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_and_on_four_ranks_with_the_same_batches(work, tmp_path):
    """Issue 18's acceptance: 2 ranks x 1 data worker, --zero, SIGKILLed after the step-6 checkpoint of 12;
    resumed in one process and on 4 ranks with half the micro-batch, every step sees the very same global
    batch (batch_hash) and the losses agree within float reordering."""
    nodrop = work["root"] / "nodrop.json"
    # dropout masks would differ with the rank count
    nodrop.write_text(json.dumps({**TINY, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}))

    def torchrun(n: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                "-m", "minicodeparrot", "train"]

    def args(out: Path, *extra: str) -> list[str]:
        a = _args(work, out, "--max-train-steps", "12", "--save-checkpoint-steps", "6",
                  "--max-eval-steps", "1", "--zero", *extra)
        a[a.index("--model-config") + 1] = str(nodrop)
        return a

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _run([*torchrun(2), *args(ref, "--data-workers", "1")])
    proc = subprocess.Popen([*torchrun(2), *args(cut, "--data-workers", "1")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not (cut / "step_6").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_tree(proc.pid)
    proc.wait()
    assert [p.name for p in list_checkpoints(cut)] == ["step_6"]
    ref_loss, ref_hash = _metrics(ref)[0], _hashes(ref)
    assert len(set(ref_hash.values())) == 12  # twelve different global batches
    for name, launch, micro in (("one", [sys.executable, "-m", "minicodeparrot", "train"], "4"),
                                ("four", torchrun(4), "2")):
        out = tmp_path / name
        shutil.copytree(cut / "step_6", out / "step_6")
        r = _run([*launch, *args(out, "--train-batch-size", micro, "--resume-from-checkpoint", "latest")])
        assert "gradient accumulation" in r.stderr or name == "four", r.stderr[-2000:]
        loss, hashes = _metrics(out)[0], _hashes(out)
        assert {s: hashes[s] for s in range(7, 13)} == {s: ref_hash[s] for s in range(7, 13)}, name
        for s in range(7, 13):
            assert abs(loss[s] - ref_loss[s]) < 1e-3, (name, s, loss[s], ref_loss[s])


def test_resume_with_a_micro_batch_that_cannot_divide_is_one_line(work, tmp_path):
    cmd = [sys.executable, "-m", "minicodeparrot", "train"]
    out = tmp_path / "m"
    _run([*cmd, *_args(work, out, "--max-train-steps", "2", "--save-checkpoint-steps", "2",
                       "--max-eval-steps", "1")])
    r = subprocess.run([*cmd, *_args(work, out, "--max-train-steps", "4", "--train-batch-size", "3",
                                     "--resume-from-checkpoint", "latest")],
                       env=ENV, capture_output=True, text=True, timeout=200)
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert "global batch is 4 sequences per step" in errors[0] and "use one of [1, 2, 4]" in errors[0]
    (out / "step_2" / "rank_0.pt").unlink()
    r = subprocess.run([*cmd, *_args(work, out, "--max-train-steps", "4", "--resume-from-checkpoint",
                                     "latest")], env=ENV, capture_output=True, text=True, timeout=200)
    assert r.returncode == 2 and "has no rank_0.pt" in r.stderr and "Traceback" not in r.stderr


# --- the Hugging Face course's recipe (issue 22) ------------------------------------------------------------
def _full_chunks(work: dict, seq_length: int) -> int:
    """Full seq_length chunks over the training files, each file cut alone (counted with the plain encoder,
    not the packer)."""
    from minicodeparrot.sources.shards import iter_texts
    from minicodeparrot.tokenizer.bpe import Tokenizer

    tok = Tokenizer.from_pretrained(work["tok"])
    return sum(len(tok.encode(text)) // seq_length for text in iter_texts(work["train"]))


def test_epochs_from_a_counting_pass_and_from_token_shards(work, tmp_path, capsys):
    from minicodeparrot.data.pretokenize import pretokenize
    from minicodeparrot.tokenizer.bpe import Tokenizer

    # Per-file chunks of 32 at 8 x 64 sequences a step: the epoch is all full steps of the counted chunks.
    chunks = _full_chunks(work, 32)
    argv = _args(work, tmp_path / "files", "--num-train-epochs", "1", "--packing", "per-file",
                 "--train-batch-size", "64", "--gradient-accumulation-steps", "8")
    assert _steps_of(argv) == chunks // (64 * 8) >= 1
    assert f"counted {chunks} sequences of 32 tokens (per-file packing)" in capsys.readouterr().err

    # Token shards: the windows per consumer, known from the headers; 2 epochs are twice the steps.
    tok = Tokenizer.from_pretrained(work["tok"])
    for split in ("train", "valid"):
        pretokenize(work[split], tok, tmp_path / split, packing="per-file", seq_length=32,
                    show_progress=False)
    argv = _args(work, tmp_path / "out", "--num-train-epochs", "2", "--tokenized", "--packing", "per-file",
                 "--train-batch-size", "256", "--gradient-accumulation-steps", "4",
                 "--dataset-name-train", str(tmp_path / "train"),
                 "--dataset-name-valid", str(tmp_path / "valid"))
    assert _steps_of(argv) == 2 * (chunks // 1024)


def _steps_of(argv: list[str]) -> int:
    """The run's max_train_steps as set_up fixes it (no step taken)."""
    from minicodeparrot.cli import build_parser

    args = build_parser().parse_args(["train", *argv])
    cfg, _ = T.resolve_config(T.given_values(args), args.preset)
    cfg.data_workers = 0
    run = T.set_up(cfg, T.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    run.train_data.close()
    run.metrics.close()
    run.stop.restore()
    return run.cfg.max_train_steps


def test_epochs_errors_are_one_line(work, tmp_path, capsys):
    from hubserver import HubServer

    from minicodeparrot.cli import main

    def error(*extra: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["train", *_args(work, tmp_path / "e", *extra)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
        return errors[0]

    assert "either --num-train-epochs or --max-train-steps" in error("--num-train-epochs", "1",
                                                                     "--max-train-steps", "5")
    with HubServer(datasets={"me/data": work["train"]}) as server:
        os.environ["HF_ENDPOINT"] = server.url
        try:
            err = error("--num-train-epochs", "1", "--dataset-name-train", "hub://me/data")
        finally:
            del os.environ["HF_ENDPOINT"]
    assert "streamed Hub dataset" in err and "--max-train-steps" in err
    assert "is a single token" in error("--keytoken-loss", "--keytokens", "matplotlib", "--max-train-steps",
                                        "2")


def test_course_preset_trains_and_pushes_every_save_through_a_failing_hub(work, tmp_path, monkeypatch):
    """--preset codeparrot-ds with a tiny model: per-file chunks, key-token loss, a push at every save to a
    loopback Hub that fails half the upload requests at random and every other push outright."""
    from hubserver import HubServer

    from minicodeparrot.cli import build_parser
    from minicodeparrot.sources import hub

    monkeypatch.setenv("HF_TOKEN", "hf_write")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=6, base_delay=0.001, max_delay=0.01,
                                                       timeout=(5.0, 5.0)))
    push = T.push_to_hub
    saves = []

    def push_with_outage(run):  # every other push meets a Hub that is down for all its retries
        saves.append(run.step)
        if len(saves) % 2:
            server.upload_faults.extend([("status", 503)] * hub.RETRY.attempts)
        push(run)

    monkeypatch.setattr(T, "push_to_hub", push_with_outage)
    out = tmp_path / "out"
    with HubServer(upload_dir=tmp_path / "hub", token="hf_write", cross_host=True) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.upload_fault_rate(0.5, seed=3)
        argv = _args(work, out, "--preset", "codeparrot-ds", "--model-config", str(work["model"]),
                     "--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--max-train-steps",
                     "6", "--save-checkpoint-steps", "2", "--keytokens", "def,self,(",
                     "--push-to-hub", "me/run")
        result = T.train(build_parser().parse_args(["train", *argv]))
        commits = [c["summary"] for c in server.commits["me/run"]]
        assert result["step"] == 6 and server.random_upload_faults > 0 and saves == [2, 4, 6]
        named = [c.removeprefix("step ").replace(" (also covers step", ",").rstrip(")") for c in commits]
        covered = sorted(int(s) for c in named for s in c.split(", "))
        # How many commits there are depends on timing: a save made while the previous push is still
        # retrying is folded into the next commit ("step 6 (also covers step 2, 4)"). What must hold is
        # that every save is named by some commit, and that the last commit is the final step's.
        assert covered == [2, 4, 6] and commits[-1].startswith("step 6"), commits
        recorded = json.loads((out / "train_args.json").read_text())
        assert recorded["packing"] == "per-file" and recorded["keytoken_loss"]
        assert recorded["seq_length"] == 32 and recorded["gradient_accumulation_steps"] == 2
        assert recorded["learning_rate"] == 5e-4 and recorded["mixed_precision"] == "no"  # auto, on a CPU
        pushed = GPT.from_pretrained("me/run").state_dict()  # by its Hub id, through the download side
        final = GPT.from_pretrained(out).state_dict()
        assert all(torch.equal(pushed[k], final[k]) for k in final)
        assert [json.loads(x)["step"] for x in (server.upload_dir / "me/run" / "metrics.jsonl").read_text()
                .splitlines()][-1] == 6
