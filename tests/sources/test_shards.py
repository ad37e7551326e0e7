"""sources/shards.py: local/Hub sources, bad records, per-consumer splits, shuffle, exact resume."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import stdlib_texts
from hubserver import HubServer, write_shards

from minicodeparrot.errors import UserError
from minicodeparrot.sources import hub, shards
from minicodeparrot.sources.shards import (
    BadRecordWarning,
    ShardStream,
    iter_records,
    iter_texts,
    resolve_sources,
)

TEXTS = stdlib_texts(60)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "data", TEXTS, n_files=5)
    return tmp_path / "data"


def keys(records) -> list[str]:
    return [r["repo_name"] for r in records]


def all_keys() -> list[str]:
    return [f"owner{i % 7}/repo{i}" for i in range(len(TEXTS))]


def test_resolve_sources_local(tmp_path: Path, shard_dir: Path) -> None:
    (shard_dir / "README.md").write_text("not data")
    (shard_dir / "sub").mkdir()
    write_shards(shard_dir / "sub", TEXTS[:3], n_files=1, suffix=".jsonl")
    names = [Path(s.name).relative_to(shard_dir).as_posix() for s in resolve_sources(shard_dir)]
    assert names == [f"file-00000000000{k}.json.gz" for k in range(5)] + ["sub/file-000000000000.jsonl"]
    assert len(resolve_sources(str(shard_dir / "file-*.json.gz"))) == 5
    assert len(resolve_sources([shard_dir / "file-000000000001.json.gz", str(shard_dir / "sub")])) == 2
    with pytest.raises(UserError, match="neither a local"):
        resolve_sources(str(tmp_path / "missing.json.gz"))
    with pytest.raises(UserError, match="no data files match"):
        resolve_sources(str(tmp_path / "*.parquet"))
    with pytest.raises(UserError, match="holds no"):
        (tmp_path / "empty").mkdir()
        resolve_sources(tmp_path / "empty")


def test_local_owner_name_path_wins_over_hub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_shards(tmp_path / "owner" / "name", TEXTS[:4], n_files=1)
    assert len(list(iter_records("owner/name"))) == 4  # a local dir named like a repo is read locally


@pytest.mark.parametrize("suffix", [".json.gz", ".jsonl.gz", ".json", ".jsonl"])
def test_formats_give_the_records_in_order(tmp_path: Path, suffix: str) -> None:
    write_shards(tmp_path, TEXTS, n_files=3, suffix=suffix)
    records = list(iter_records(tmp_path))
    assert keys(records) == all_keys()
    assert [r["content"] for r in records] == TEXTS
    assert list(iter_texts(tmp_path, n=5)) == TEXTS[:5]


def test_json_array_file(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"content": t} for t in TEXTS[:4]], indent=1))
    assert list(iter_texts(tmp_path / "a.json")) == TEXTS[:4]


def test_bad_records_are_counted_reported_and_fatal_in_strict_mode(tmp_path: Path) -> None:
    good = [json.dumps({"content": f"x = {i}\n"}) for i in range(6)]
    lines = [good[0], "{not json", good[1], json.dumps({"text": "no content field"}), "", good[2]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    whole = gzip.compress(("\n".join(good[3:] * 200) + "\n").encode())
    (tmp_path / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # truncated gzip
    stats = shards.BadRecords()
    with pytest.warns(BadRecordWarning) as caught:
        texts = [r["content"] for r in iter_records(tmp_path, stats=stats)]
    messages = [str(w.message) for w in caught]
    assert texts[:3] == ["x = 0\n", "x = 1\n", "x = 2\n"] and len(texts) > 3
    assert (stats.not_json, stats.missing_field, stats.truncated_files) == (1, 1, 1)
    assert any("a.jsonl:2: line is not JSON" in m for m in messages)
    assert any("a.jsonl:4: record has no string field 'content'" in m for m in messages)
    assert any("b.jsonl.gz: truncated" in m for m in messages)
    assert any("skipped 3 bad records" in m for m in messages)
    with pytest.raises(UserError, match="a.jsonl:2"):
        list(iter_records(tmp_path, strict=True))
    with pytest.raises(UserError, match="truncated"):
        list(iter_records(tmp_path / "b.jsonl.gz", strict=True))
    stream = ShardStream(tmp_path, shuffle_files=False)
    with pytest.warns(BadRecordWarning):
        assert len(list(stream)) == len(texts)
    assert stream.bad_records.total == 3


def test_outside_ddp_yields_everything_in_file_order(shard_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert keys(ShardStream(shard_dir, shuffle_files=False, shuffle_buffer=0)) == all_keys()
    shuffled = keys(ShardStream(shard_dir, seed=1, shuffle_buffer=10))
    assert shuffled != all_keys() and sorted(shuffled) == sorted(all_keys())
    assert shuffled == keys(ShardStream(shard_dir, seed=1, shuffle_buffer=10))  # seeded
    assert shuffled != keys(ShardStream(shard_dir, seed=2, shuffle_buffer=10))
    stream = ShardStream(shard_dir, seed=1, shuffle_buffer=10)
    stream.set_epoch(1)
    assert keys(stream) != shuffled  # a new epoch reshuffles ...
    stream.set_epoch(0)
    assert keys(stream) == shuffled  # ... and restarting an epoch repeats it


def test_shuffle_buffer_is_a_local_shuffle(shard_dir: Path) -> None:
    # A record can leave a buffer of B only after it entered: output index >= input index - B.
    order = {k: i for i, k in enumerate(all_keys())}
    out = keys(ShardStream(shard_dir, shuffle_files=False, shuffle_buffer=8, seed=5))
    assert all(j >= order[k] - 8 for j, k in enumerate(out))
    assert max(order[k] - j for j, k in enumerate(out)) > 0


@pytest.mark.parametrize("n_files", [1, 2, 3, 5, 8])
def test_splits_are_disjoint_and_complete(tmp_path: Path, n_files: int) -> None:
    write_shards(tmp_path, TEXTS[:40], n_files=n_files)
    expected = sorted(all_keys()[:40])
    for consumers in range(1, 9):
        parts = [keys(ShardStream(tmp_path, rank=r, world_size=consumers, seed=3, shuffle_buffer=4))
                 for r in range(consumers)]
        assert sorted(k for p in parts for k in p) == expected, (n_files, consumers)
        assert all(parts), (n_files, consumers)  # nobody starves: 40 records are enough for 8 consumers


def test_rank_from_environment(shard_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        parts.append(keys(ShardStream(shard_dir, shuffle_files=False)))
    assert sorted(parts[0] + parts[1]) == sorted(all_keys()) and not set(parts[0]) & set(parts[1])
    assert keys(ShardStream(shard_dir, split_by_rank=False, shuffle_files=False)) == all_keys()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="outside world size"):
        list(ShardStream(shard_dir))


def test_dataloader_workers_split_the_data(shard_dir: Path) -> None:
    got = []
    for rank in (0, 1):
        stream = ShardStream(shard_dir, rank=rank, world_size=2, seed=0, shuffle_buffer=3)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        got += keys(loader)
    assert sorted(got) == sorted(all_keys())


@pytest.mark.parametrize(("n_files", "world", "buffer"), [(5, 1, 0), (5, 1, 7), (5, 2, 4), (2, 3, 5)])
def test_resume_continues_with_identical_records(tmp_path: Path, n_files: int, world: int, buffer: int):
    write_shards(tmp_path, TEXTS, n_files=n_files)
    make = lambda: ShardStream(tmp_path, seed=9, shuffle_buffer=buffer, rank=world - 1, world_size=world)
    full = keys(make())
    for cut in sorted({0, 1, 5, len(full) // 2, len(full) - buffer - 1, len(full) - 1, len(full)}):
        if cut < 0:
            continue
        stream = make()
        it = iter(stream)
        head = [next(it)["repo_name"] for _ in range(cut)]
        state = pickle.loads(pickle.dumps(stream.state_dict()))  # as a checkpoint would store it
        resumed = make()
        resumed.load_state_dict(state)
        assert head + keys(resumed) == full, cut
        assert keys(resumed) == full  # only the first pass after load_state_dict resumes


def test_resume_rejects_another_split_and_new_epoch_drops_it(shard_dir: Path) -> None:
    stream = ShardStream(shard_dir, rank=0, world_size=2)
    it = iter(stream)
    next(it)
    state = stream.state_dict()
    other = ShardStream(shard_dir, rank=0, world_size=4)
    other.load_state_dict(state)
    with pytest.raises(UserError, match="consumer 0 of 2"):
        list(other)
    same = ShardStream(shard_dir, rank=0, world_size=2)
    same.load_state_dict(state)
    same.set_epoch(1)  # a saved position inside epoch 0 does not apply to epoch 1
    assert len(keys(same)) == len(keys(ShardStream(shard_dir, rank=0, world_size=2)))


def test_resume_state_refers_to_records_and_rejects_changed_data(tmp_path: Path) -> None:
    write_shards(tmp_path, TEXTS, n_files=2)
    stream = ShardStream(tmp_path, seed=4, shuffle_buffer=7)
    it = iter(stream)
    for _ in range(10):
        next(it)
    state = stream.state_dict()
    refs = state["buffer"]["items"]
    assert refs.dtype == torch.int64 and refs.shape == (7, 3)  # (file, line, text length): not the texts
    assert len(pickle.dumps(state)) < int(refs[:, 2].sum())  # smaller than the buffered texts themselves
    write_shards(tmp_path, TEXTS[::-1], n_files=2)  # the same files and lines, other records
    changed = ShardStream(tmp_path, seed=4, shuffle_buffer=7)
    changed.load_state_dict(state)
    with pytest.raises(UserError, match=r"cannot resume: .*file-0+\d\.json\.gz line \d+ is no longer"):
        next(iter(changed))


def content_hash(records) -> tuple[int, str]:
    digest = sorted(hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in records)
    return len(digest), hashlib.sha256("".join(digest).encode()).hexdigest()


def test_hub_dataset_through_faults_gives_exactly_the_records(tmp_path: Path, monkeypatch) -> None:
    write_shards(tmp_path / "repo", TEXTS, n_files=4)
    write_shards(tmp_path / "repo" / "extra", TEXTS[:10], n_files=1, suffix=".jsonl")
    (tmp_path / "repo" / "README.md").write_text("# a dataset card")
    local = list(iter_records(tmp_path / "repo"))
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=10, base_delay=0.001, max_delay=0.01,
                                                       timeout=(5, 5)))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with HubServer(datasets={"owner/codeparrot-mini": tmp_path / "repo"}, page_size=2) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.random_faults(rate=0.4, seed=11)
        assert len(resolve_sources("owner/codeparrot-mini")) == 5
        remote = list(iter_records("hub://owner/codeparrot-mini@main"))
        streamed = keys(ShardStream("owner/codeparrot-mini", seed=2, shuffle_buffer=6))
        faults = sum(1 for r in server.log if "Range" in r[2])
    assert content_hash(remote) == content_hash(local)
    assert sorted(streamed) == sorted(keys(local))
    assert faults > 0  # the run really had to resume
