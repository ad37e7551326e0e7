"""data/loader.py: persistent data workers: exact resume, worker counts, crashes, validation."""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import stdlib_texts
from hubserver import write_shards

from minicodeparrot.data.loader import build_valid_loader
from minicodeparrot.data.pipeline import build_valid_data
from minicodeparrot.data.streams import build_train_loader, new_layout
from minicodeparrot.errors import UserError
from minicodeparrot.tokenizer.bpe import Tokenizer

TEXTS = stdlib_texts(48)
# Small buffers, so that a few dozen batches cross packing buffers, fill both shuffle buffers and replace
# their items: the state then holds everything that has to survive a resume.
# A step is 8 sequences from 4 streams, 2 micro-batches of 4.
LAYOUT = new_layout(global_batch=8, world_size=1, streams=4, record_shuffle_buffer=24,
                    sequence_shuffle_buffer=96)
TRAIN = dict(layout=LAYOUT, seq_length=64, seed=3, micro_batch=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    write_shards(root / "train", TEXTS, n_files=6)
    write_shards(root / "valid", TEXTS[:12], n_files=3)
    return root


@pytest.fixture(scope="module")
def tok(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


def take(loader, n: int) -> list[torch.Tensor]:
    return [b.clone() for b in itertools.islice(loader, n)]


def checkpointed(state: dict) -> dict:
    """The state as a checkpoint file gives it back: torch.save, then a weights_only load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def children_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def test_a_worker_dying_while_staging_fails_the_next_batch(corpus, tok):
    loader = build_train_loader(corpus / "train", tok, num_workers=2, prefetch=2, **TRAIN)
    take(loader, 2)  # one step
    pid = loader.inner._procs[0].pid
    os.kill(pid, signal.SIGKILL)
    loader.stage(2)  # the step in progress goes on: the error waits for the batch that cannot come
    with pytest.raises(UserError, match=rf"data worker 0 \(pid {pid}\) of rank 0 was killed by SIGKILL"):
        take(loader, 50)
    assert children_alive([p.pid for p in loader.inner._procs]) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_worker_ends_the_consumer_in_one_line(corpus, tok, sig):
    old = signal.signal(signal.SIGTERM, lambda *a: None)  # a trainer's handler: workers must not inherit it
    try:
        loader = build_train_loader(corpus / "train", tok, num_workers=2, prefetch=2, **TRAIN)
        take(loader, 2)
    finally:
        signal.signal(signal.SIGTERM, old)
    pids = [p.pid for p in loader.inner._procs]
    for pid in pids:  # SIGTERM has its default action, SIGINT is ignored (the trainer handles both)
        status = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert not int(status["SigCgt"], 16) >> (signal.SIGTERM - 1) & 1
        assert int(status["SigIgn"], 16) >> (signal.SIGINT - 1) & 1
    os.kill(pids[1], sig)
    with pytest.raises(UserError, match=rf"data worker 1 \(pid {pids[1]}\) of rank 0 was killed by {sig.name}"
                       ) as e:
        take(loader, 50)  # the batches already sent come first, then the error: never a hang
    assert "\n" not in str(e.value)
    assert children_alive(pids) == []
    state = loader.state_dict()  # still the position after the last step taken: a checkpoint can follow
    assert sorted(state["streams"]) == [0, 1, 2, 3] and all(v is not None for v in state["streams"].values())


def test_failing_worker_reports_its_error(corpus, tok, tmp_path):
    (tmp_path / "tokens").mkdir()
    loader = build_train_loader(tmp_path / "tokens", tok, num_workers=1, tokenized=True, **TRAIN)
    with pytest.raises(UserError, match=r"data worker 0 of rank 0 failed: .* holds no tokens-\*\.bin"):
        next(loader)
    assert children_alive([p.pid for p in loader.inner._procs]) == []


def test_workers_die_with_the_trainer(corpus, gpt2_dir):
    script = textwrap.dedent(f"""
        import os, sys
        from minicodeparrot.data.streams import build_train_loader, new_layout
        from minicodeparrot.tokenizer.bpe import Tokenizer
        if __name__ == "__main__":
            tok = Tokenizer.from_pretrained({str(gpt2_dir)!r})
            layout = new_layout(8, 1, 4, 24, 96)
            loader = build_train_loader({str(corpus / "train")!r}, tok, layout, num_workers=1, seq_length=64,
                                        seed=3, micro_batch=4)
            next(loader)
            print(loader.inner._procs[0].pid, flush=True)
            os._exit(0)  # no clean-up runs: only the kernel's parent-death signal can stop the worker
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert r.returncode == 0, r.stderr[-2000:]
    pid = int(r.stdout.split()[-1])
    deadline = time.time() + 60  # the kernel kills it at once; a busy machine may take a while to reap it
    while children_alive([pid]) and time.time() < deadline:
        time.sleep(0.1)
    assert children_alive([pid]) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_reads_every_share_once(corpus, tok, workers):
    kw = dict(seq_length=64, batch_size=5)
    with build_valid_loader(corpus / "valid", tok, num_workers=workers, **kw) as loader:
        first = [b.clone() for b in loader]
        again = [b.clone() for b in loader]  # a new pass reads the same batches
        stats = loader.stats
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    shares = max(1, workers)
    expected = [block.tolist() for w in range(shares)
                for block in build_valid_data(corpus / "valid", tok, seq_length=64, worker=w, workers=shares)]
    got = [row.tolist() for b in first for row in b]
    assert sorted(got) == sorted(expected) and len(got) == len(expected) > 10
    assert stats["tokens_total"] > len(got) * 64 and stats["bad_records"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_arrive_on_the_gpu(corpus, tok):
    with build_train_loader(corpus / "train", tok, num_workers=1, device="cuda", **TRAIN) as loader:
        batch = next(loader)
    assert batch.is_cuda and batch.dtype == torch.long


def test_closing_keeps_an_endless_loaders_position(corpus, tok):
    with build_train_loader(corpus / "train", tok, **TRAIN) as loader:
        full = take(loader, 8)
    loader = build_train_loader(corpus / "train", tok, **TRAIN)
    head = take(loader, 3)  # in the middle of a step: its last micro-batch is still to come
    loader.close()
    assert all(torch.equal(a, b) for a, b in zip(full, head + take(loader, 5), strict=True))
