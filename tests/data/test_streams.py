"""data/streams.py: virtual streams give the same global batches on any number of ranks and workers,
and their state resumes exactly on any of them."""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stdlib_texts
from hubserver import write_shards

from minicodeparrot.data.streams import (
    DataLayout,
    accumulation_steps,
    build_stream,
    build_train_loader,
    new_layout,
    rank_streams,
)
from minicodeparrot.errors import UserError
from minicodeparrot.tokenizer.bpe import Tokenizer

TEXTS = stdlib_texts(48)
# 4 streams, a global batch of 8 sequences: each step takes 2 blocks of every stream. Small buffers, so
# that a few steps cross packing buffers and fill both shuffle buffers: the state then holds everything.
LAYOUT = new_layout(global_batch=8, world_size=1, streams=4, record_shuffle_buffer=24,
                    sequence_shuffle_buffer=96)
KW = dict(seq_length=64, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("streams")
    write_shards(root / "train", TEXTS, n_files=6)
    return root / "train"


@pytest.fixture(scope="module")
def tok(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


def checkpointed(state: dict) -> dict:
    """The state as a checkpoint file gives it back: torch.save, then a weights_only load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def steps(loaders: list, n: int) -> list[list[tuple]]:
    """n optimizer steps of a whole job: every rank's micro-batches of the step, as a sorted multiset."""
    out = []
    for _ in range(n):
        rows = []
        for loader in loaders:
            for _ in range(loader.k):
                rows += [tuple(r.tolist()) for r in next(loader)]
        out.append(sorted(rows))
    return out


def job(corpus, tok, world: int, micro: int, workers: int = 0) -> list:
    return [build_train_loader(corpus, tok, LAYOUT, rank=r, world_size=world, micro_batch=micro,
                               num_workers=workers, **KW) for r in range(world)]


def test_layout_arithmetic():
    layout = new_layout(global_batch=96, world_size=8, streams=None, record_shuffle_buffer=10_000,
                        sequence_shuffle_buffer=10_000)
    assert layout == DataLayout(streams=96, global_batch=96, record_buffer=834, sequence_buffer=834)
    assert rank_streams(layout, 3, 8) == list(range(3, 96, 8))
    assert accumulation_steps(layout, 4, 12) == 2 and accumulation_steps(layout, 8, 12) == 1
    with pytest.raises(UserError, match="global batch is 96 sequences per step, 24 per rank on 4 ranks, "
                                        "which --train-batch-size 7 does not divide"):
        accumulation_steps(layout, 4, 7)
    with pytest.raises(UserError, match="96 streams, which 5 ranks cannot share evenly"):
        accumulation_steps(layout, 5, 1)
    with pytest.raises(UserError, match="--data-streams 5 must divide the global batch"):
        new_layout(96, 8, 5, 100, 100)


def test_streams_are_disjoint_and_cover_the_data(tmp_path, tok):
    write_shards(tmp_path, TEXTS, n_files=7)
    layout = new_layout(4, 1, 4, 8, 0)

    def paths(stream: int, streams: DataLayout) -> list[str]:
        pipe = build_stream(tmp_path, tok, stream, streams, seq_length=32, seed=1)
        return [r["path"] for r in pipe.source.dataset]  # one pass of its ShardStream

    everything = paths(0, new_layout(1, 1, 1, 8, 0))
    parts = [paths(s, layout) for s in range(4)]
    assert sorted(everything) == sorted(sum(parts, []))
    assert len(set(everything)) == len(everything) == sum(map(len, parts))


def test_stream_state_is_compact_and_checkpointable(tmp_path, tok):
    """uint16 blocks and (file, line) references: ~2 bytes per buffered token, ~24 per buffered record."""
    write_shards(tmp_path, TEXTS, n_files=4)
    layout = DataLayout(streams=1, global_batch=1, record_buffer=12, sequence_buffer=200)
    pipe = build_stream(tmp_path, tok, 0, layout, seq_length=64, seed=0)
    blocks = iter(pipe)
    assert next(blocks).dtype == np.uint16  # GPT-2's 50,257 ids fit
    while pipe.state_dict()["source"]["source_state"] is None:  # until a packing buffer starts mid-file
        next(blocks)
    state = pipe.state_dict()
    assert state["sequences"]["items"].shape == (200, 64)
    assert state["source"]["source_state"]["buffer"]["items"].shape == (12, 3)
    buf = io.BytesIO()
    torch.save(state, buf)
    assert buf.tell() < 200 * 64 * 2 + 12 * 24 + 32_000
    buf.seek(0)
    resumed = build_stream(tmp_path, tok, 0, layout, seq_length=64, seed=0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    ahead = list(itertools.islice(blocks, 300))
    assert all(np.array_equal(a, b) for a, b in zip(ahead, itertools.islice(resumed, 300), strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_any_worker_count_is_bitwise(corpus, tok, workers):
    with build_train_loader(corpus, tok, LAYOUT, micro_batch=4, **KW) as loader:
        full = [b.clone() for b in itertools.islice(loader, 12)]  # 6 steps of 2 micro-batches
    assert all(b.shape == (4, 64) and b.dtype == torch.long for b in full)
    assert len({tuple(b.flatten().tolist()) for b in full}) == 12  # a real stream, not one batch
    with build_train_loader(corpus, tok, LAYOUT, micro_batch=4, num_workers=3, **KW) as loader:
        head = [b.clone() for b in itertools.islice(loader, 6)]
        loader.stage(2)  # as the training loop does before it checkpoints
        time.sleep(0.5)  # let the workers run ahead: the state must still be the one after step 3
        state = checkpointed(loader.state_dict())
        staged = [b.clone() for b in itertools.islice(loader, 4)]  # the staged step, then one as usual
    assert all(torch.equal(a, b) for a, b in zip(full[6:10], staged, strict=True))
    with build_train_loader(corpus, tok, LAYOUT, micro_batch=4, num_workers=workers, **KW) as resumed:
        resumed.load_state_dict(state)
        tail = [b.clone() for b in itertools.islice(resumed, 6)]
    for i, (a, b) in enumerate(zip(full, head + tail, strict=True)):
        assert torch.equal(a, b), f"micro-batch {i} differs after resuming at 6"


def test_global_batches_are_the_same_on_any_number_of_ranks(corpus, tok):
    one = steps(job(corpus, tok, world=1, micro=4), 3)
    assert one == steps(job(corpus, tok, world=2, micro=2), 3)
    assert one == steps(job(corpus, tok, world=4, micro=1, workers=1), 3)


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_four(corpus, tok):
    reference = steps(job(corpus, tok, world=2, micro=4), 5)
    two = job(corpus, tok, world=2, micro=4)
    assert steps(two, 2) == reference[:2]
    saved = [checkpointed(loader.state_dict()) for loader in two]  # rank_0.pt, rank_1.pt

    def resumed(world: int, micro: int) -> list:
        loaders = job(corpus, tok, world=world, micro=micro)
        for loader in loaders:  # each rank collects its streams from the files that hold them
            merged = dict(saved[0], streams={**saved[0]["streams"], **saved[1]["streams"]})
            loader.load_state_dict(merged)
        return loaders

    assert steps(resumed(1, 4), 3) == reference[2:]
    assert steps(resumed(4, 1), 3) == reference[2:]


def test_missing_or_foreign_state_is_a_one_line_error(corpus, tok):
    loader = build_train_loader(corpus, tok, LAYOUT, micro_batch=4, **KW)
    state = loader.state_dict()
    with pytest.raises(UserError, match=r"no state for data streams \[3\]; a rank file is missing"):
        loader.load_state_dict(dict(state, streams={s: v for s, v in state["streams"].items() if s != 3}))
    with pytest.raises(UserError, match="saved per rank by an older minicodeparrot"):
        loader.load_state_dict({"version": 1, "pipelines": [None]})
    with pytest.raises(UserError, match="is not this run's"):
        loader.load_state_dict(dict(state, layout=dict(state["layout"], streams=8)))
