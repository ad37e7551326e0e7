"""data/pipeline.py and sources/shuffle.py: shuffle buffer, one share's pipeline and state, validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import stdlib_texts
from hubserver import write_shards

from minicodeparrot.data.packing import ConstantLengthDataset
from minicodeparrot.data.pipeline import (
    PipelineMirror,
    build_valid_data,
    rng_words,
    validation_sources,
)
from minicodeparrot.data.pretokenize import pretokenize
from minicodeparrot.sources.shards import ShardStream
from minicodeparrot.sources.shuffle import ShuffleBuffer
from minicodeparrot.tokenizer.bpe import Tokenizer

TEXTS = stdlib_texts(40)


@pytest.fixture(scope="module")
def tok(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


def shuffled(items, size, seed, cut=None):
    """Run a ShuffleBuffer over `items`; with `cut`, save the state after `cut` outputs and resume."""
    buf, out = ShuffleBuffer(size, seed), []
    it = iter(items)
    for x in it:
        if (y := buf.push(x)) is not None:
            out.append(y)
        if cut is not None and len(out) == cut:
            state = buf.state_dict()
            buf = ShuffleBuffer(size, "another seed")
            buf.load_state_dict(state)
    for y in buf.drain():
        out.append(y)
        if cut is not None and len(out) == cut:
            state = buf.state_dict()
            buf2 = ShuffleBuffer(size, "x")
            buf2.load_state_dict(state)
            return out + list(buf2.drain())
    return out


def test_shuffle_buffer_is_a_seeded_local_shuffle():
    items = list(range(200))
    out = shuffled(items, 10, "s")
    assert sorted(out) == items and out != items
    assert out == shuffled(items, 10, "s") and out != shuffled(items, 10, "t")
    # Local: an item leaves at the earliest when the buffer is full, so nothing moves forward by >= size.
    assert all(pos >= x - 10 for pos, x in enumerate(out))
    assert shuffled(items, 1, "s") == items and shuffled(items, 0, "s") == items


@pytest.mark.parametrize("cut", [0, 1, 50, 190, 195, 199])
def test_shuffle_buffer_resumes_exactly_even_while_draining(cut):
    items = list(range(200))
    assert shuffled(items, 10, "s", cut=cut) == shuffled(items, 10, "s")


def test_journal_lets_a_mirror_follow_the_buffer():
    rng = random.Random(0)
    buf = ShuffleBuffer(16, "j", journal=True)
    mirror = PipelineMirror(None, 16, 4)
    for step in range(30):
        for _ in range(3):
            buf.push(np.array([rng.randrange(1000) for _ in range(4)], dtype=np.uint16))
        writes = buf.take_journal()
        mirror.apply({"source": {"step": step}, "kept": [], "slots": [s for s, _ in writes],
                      "blocks": np.stack([b for _, b in writes]), "rng": rng_words(buf.rng)})
    state = mirror.state_dict()
    assert np.array_equal(state["sequences"]["items"].numpy(), np.stack(buf.items))
    assert state["sequences"]["rng"] == buf.rng.getstate() and state["source"] == {"step": 29}


def test_valid_data_keeps_validation_shards_and_reads_token_shards(tmp_path, tok):
    write_shards(tmp_path / "c", TEXTS[:20], n_files=2)
    valid = tmp_path / "c" / "file-000000000001_validation.json.gz"
    (tmp_path / "c" / "file-000000000001.json.gz").rename(valid)
    assert [s.name.split("/")[-1] for s in validation_sources(tmp_path / "c")] == [
        "file-000000000001_validation.json.gz"]
    blocks = [b.tolist() for b in build_valid_data(tmp_path / "c", tok, seq_length=64)]
    stream = ShardStream(valid, shuffle_files=False)
    assert blocks == [b.tolist() for b in ConstantLengthDataset(tok, stream, seq_length=64)]
    pretokenize(valid, tok, tmp_path / "tok",
                show_progress=False)
    windows = [b.tolist() for b in build_valid_data(tmp_path / "tok", tok, seq_length=64, tokenized=True)]
    # The pretokenized stream is the packer's stream without the per-buffer tail drops.
    assert windows[:len(blocks) // 2] == blocks[:len(blocks) // 2] and len(windows) >= len(blocks)
