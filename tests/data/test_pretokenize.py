"""Pretokenized binary shards: writer against the reference tokenizer, memory-mapped windows, resume."""

from __future__ import annotations

import itertools
import struct
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch
from conftest import FIXTURES, stdlib_texts

from minicodeparrot.data.pretokenize import (
    HEADER_SIZE,
    TokenShardDataset,
    pretokenize,
    read_header,
    token_dtype,
)
from minicodeparrot.errors import UserError
from minicodeparrot.sources.corpus import make_corpus

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from minicodeparrot.tokenizer.bpe import Tokenizer

    return Tokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 stdlib files in two codeparrot shards, plus one record holding a literal <|endoftext|>."""
    root = tmp_path_factory.mktemp("src")
    for i, text in enumerate(stdlib_texts(limit=20)):
        (root / f"m{i:02d}.py").write_text(text)
    (root / "special.py").write_text('EOT = "<|endoftext|>"\n' * 60)
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, sources=[root], samples_per_file=11, validation_fraction=0.0, show_progress=False)
    return out / "train"


@pytest.fixture(scope="module")
def expected_ids(corpus):
    from minicodeparrot.sources.shards import iter_texts

    ref = tokenizers.Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    ref.encode_special_tokens = True
    return [t for text in iter_texts(corpus) for t in ref.encode(text).ids + [EOS]]


@pytest.fixture(scope="module")
def shards(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    summary = pretokenize(corpus, tokenizer, out, num_workers=1, tokens_per_shard=30_000, show_progress=False)
    return out, summary


def read_all(paths):
    return [int(t) for p in paths for t in np.fromfile(p, dtype="<u2", offset=HEADER_SIZE)]


def test_round_trip_equals_reference_tokens_with_eos(shards, expected_ids):
    out, summary = shards
    assert summary["records"] == 21 and summary["dtype"] == "uint16"
    assert summary["tokens"] == len(expected_ids)
    names = [p.name for p in summary["shards"]]
    assert names == [f"tokens-{i:06d}.bin" for i in range(len(names))]
    assert read_all(summary["shards"]) == expected_ids
    assert expected_ids.count(EOS) == 21  # the literal <|endoftext|> stayed text
    dtype, n, vocab = read_header(summary["shards"][0])
    assert (dtype, n, vocab) == (np.dtype("<u2"), 30_000, 50257)


def test_worker_count_does_not_change_the_shards(corpus, tokenizer, shards, tmp_path):
    summary = pretokenize(corpus, tokenizer, tmp_path / "w2", num_workers=2, tokens_per_shard=30_000,
                          show_progress=False)
    assert [p.read_bytes() for p in summary["shards"]] == [p.read_bytes() for p in shards[1]["shards"]]


def test_dtype_choice():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100_277) == np.uint32


def test_windows_are_the_blocks_of_each_shard(shards, expected_ids):
    out, summary = shards
    ds = TokenShardDataset(out, seq_length=1000, shuffle=False)
    tensors = list(ds)
    assert all(w.dtype == torch.long and w.shape == (1000,) for w in tensors)
    got = [w.tolist() for w in tensors]
    expected, offset = [], 0
    for p in summary["shards"]:
        n = read_header(p)[1]
        expected += [expected_ids[offset + i:offset + i + 1000] for i in range(0, n - 999, 1000)]
        offset += n
    assert got == expected


@pytest.mark.parametrize("consumers", [1, 2, 3, 8])
def test_ranks_are_disjoint_equal_and_cover_all_but_remainder(shards, consumers):
    out, _ = shards
    ds = TokenShardDataset(out, seq_length=256, seed=3)
    parts = [ds.windows(0, r, consumers) for r in range(consumers)]
    together = np.concatenate(parts)
    n = TokenShardDataset(out, seq_length=256).num_windows
    assert len(set(together.tolist())) == len(together) == n - n % consumers
    assert len({len(p) for p in parts}) == 1
    blocks = [tuple(w.tolist()) for r in range(consumers)
              for w in TokenShardDataset(out, seq_length=256, seed=3, rank=r, world_size=consumers)]
    assert len(set(blocks)) == len(blocks)


def test_dataloader_workers_split_the_windows(shards):
    out, _ = shards
    ds = TokenShardDataset(out, seq_length=256, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    got = sorted(tuple(row.tolist()) for batch in loader for row in batch)
    alone = sorted(tuple(w.tolist()) for w in TokenShardDataset(out, seq_length=256, seed=1, shuffle=False))
    assert len(set(got)) == len(got) == len(alone) - len(alone) % 2
    assert set(got) <= set(alone)


def test_seeded_shuffle_differs_per_epoch_and_is_reproducible(shards):
    out, _ = shards
    ds = TokenShardDataset(out, seq_length=256, seed=7)
    assert (ds.windows(0, 0, 1) == TokenShardDataset(out, seq_length=256, seed=7).windows(0, 0, 1)).all()
    assert not (ds.windows(0, 0, 1) == ds.windows(1, 0, 1)).all()
    assert sorted(ds.windows(1, 0, 1)) == list(range(ds.num_windows))


def test_resume_is_exact_across_epochs(shards):
    out, _ = shards
    kw = dict(seq_length=512, seed=5, infinite=True)
    n = TokenShardDataset(out, **kw).num_windows
    full = [w.tolist() for w in itertools.islice(iter(TokenShardDataset(out, **kw)), 3 * n)]
    for k in (1, n - 1, n, n + 7):
        ds = TokenShardDataset(out, **kw)
        head = [w.tolist() for w in itertools.islice(iter(ds), k)]
        resumed = TokenShardDataset(out, **kw)
        resumed.load_state_dict(ds.state_dict())
        assert head + [w.tolist() for w in itertools.islice(iter(resumed), 3 * n - k)] == full
    with pytest.raises(UserError, match="same --tokenized"):
        TokenShardDataset(out, seq_length=256).load_state_dict(ds.state_dict())


def test_malformed_headers_are_user_errors(shards, tmp_path):
    """Each malformed header has its own message (written out in full here: a shared word would let one
    check stand in for another)."""
    good = shards[1]["shards"][0].read_bytes()
    n = len(good)
    rerun = "re-run `minicodeparrot pretokenize`"
    cases = [
        (b"NOTTOKS\0" + good[8:], "{} is not a minicodeparrot token shard (bad magic); create it with "
                                  "`minicodeparrot pretokenize`"),
        (good[:20], "{} is 20 bytes, shorter than the 32-byte token-shard header; the file is truncated or "
                    f"not a token shard -- {rerun}"),
        (good[:8] + struct.pack("<I", 9) + good[12:],
         f"{{}} has token-shard format version 9; this minicodeparrot reads version 1 -- {rerun}"),
        (good[:12] + struct.pack("<I", 3) + good[16:],
         "{} declares 3 bytes per token (expected 2 or 4); the file is corrupt"),
        (good[:-10], f"{{}} is {n - 10} bytes but its header promises {n}; the file is truncated -- {rerun}"),
        (good + b"\0" * 6, f"{{}} is {n + 6} bytes, 6 more than its header promises; the file is corrupt "
                           f"(or another write appended to it) -- {rerun}"),
    ]
    for i, (data, message) in enumerate(cases):
        path = tmp_path / f"tokens-{i:06d}.bin"
        path.write_bytes(data)
        with pytest.raises(UserError) as e:
            TokenShardDataset(path)
        assert str(e.value) == message.format(path)
    with pytest.raises(UserError, match="no tokens-"):
        (tmp_path / "empty").mkdir()
        TokenShardDataset(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "tokens-000000.bin").write_bytes(good)
    (mixed / "tokens-000001.bin").write_bytes(good[:24] + struct.pack("<Q", 32768) + good[32:])
    with pytest.raises(UserError, match="different vocabularies"):
        TokenShardDataset(mixed)
    with pytest.raises(UserError, match="fewer than one window"):
        TokenShardDataset(shards[1]["shards"][-1], seq_length=10**7)


def test_cli(corpus, tmp_path, shards):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "minicodeparrot", "pretokenize", "--dataset", str(corpus), "--tokenizer",
           str(FIXTURES), "--output", str(out), "--tokens-per-shard", "30000", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "21 records" in proc.stdout
    written = [p.read_bytes() for p in sorted(out.glob("*.bin"))]
    assert written == [p.read_bytes() for p in shards[1]["shards"]]
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds token shards" in again.stderr


@pytest.mark.parametrize("num_workers", [1, 2])
def test_per_file_shards_hold_exactly_the_course_chunks(corpus, tokenizer, tmp_path, num_workers):
    """`--packing per-file`: the windows are the course tokenizer's full overflow chunks, in file order,
    also across shard boundaries (shards of 1000 tokens hold 7 chunks of 128, not 7.8)."""
    transformers = pytest.importorskip("transformers")
    from minicodeparrot.sources.shards import iter_texts

    summary = pretokenize(corpus, tokenizer, tmp_path, num_workers=num_workers, tokens_per_shard=1000,
                          packing="per-file", seq_length=128, show_progress=False)
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(FIXTURES))
    out = ref(list(iter_texts(corpus)), truncation=True, max_length=128, return_overflowing_tokens=True,
              return_length=True)
    expected = [ids for n, ids in zip(out["length"], out["input_ids"], strict=True) if n == 128]
    ds = TokenShardDataset(tmp_path, seq_length=128, shuffle=False)
    assert [ds.window(i).tolist() for i in range(ds.num_windows)] == expected
    assert all(read_header(p)[1] % 128 == 0 for p in summary["shards"]) and len(summary["shards"]) > 2
    assert summary["tokens_dropped"] == sum(n for n in out["length"] if n != 128)


def test_per_file_shards_refuse_another_packing_or_length(corpus, tokenizer, tmp_path):
    from minicodeparrot.data.pretokenize import check_shard_packing

    with pytest.raises(UserError, match="give --seq-length"):
        pretokenize(corpus, tokenizer, tmp_path / "x", packing="per-file", show_progress=False)
    pretokenize(corpus, tokenizer, tmp_path / "pf", packing="per-file", seq_length=64, show_progress=False)
    check_shard_packing(tmp_path / "pf", "per-file", 64)
    with pytest.raises(UserError, match="chunks of 64 tokens, this run has --seq-length 128"):
        check_shard_packing(tmp_path / "pf", "per-file", 128)
    with pytest.raises(UserError, match="written with --packing per-file, this run has --packing concat"):
        check_shard_packing(tmp_path / "pf", "concat", 64)
