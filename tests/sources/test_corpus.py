"""make-corpus: codeparrot-format shards of the standard library."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from conftest import stdlib_py_files

from minicodeparrot.errors import UserError
from minicodeparrot.sources.corpus import build_corpus, make_corpus

FIELDS = ["repo_name", "path", "copies", "size", "content", "license"]


def read_shard(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    stats = build_corpus(out, samples_per_file=300, show_progress=False)
    return out, stats


def test_layout_and_validation_naming(corpus):
    out, stats = corpus
    train = sorted((out / "train").iterdir())
    valid = sorted((out / "valid").iterdir())
    assert [p.name for p in train] == [f"file-{i:012d}.json.gz" for i in range(len(train))]
    assert [p.name for p in valid] == [f"file-{len(train):012d}_validation.json.gz"]
    assert stats.paths == train + valid  # validation shard last, like the real dataset


def test_records_have_codeparrot_fields_and_types(corpus):
    out, stats = corpus
    records = [r for p in stats.paths for r in read_shard(p)]
    assert len(records) == stats.kept == stats.train + stats.valid
    assert all(len(read_shard(p)) == 300 for p in stats.paths[:-2])
    for r in records:
        assert list(r) == FIELDS
        assert isinstance(r["copies"], str) and isinstance(r["size"], str)
        assert r["path"].endswith(".py")
        assert 1024 <= int(r["size"]) <= 1 << 20
        assert int(r["size"]) == len(r["content"].encode("utf-8"))
    assert len({(r["repo_name"], r["path"]) for r in records}) == len(records)
    # The validation split is a small, spread-out sample (a hash of the path, not the last files).
    valid_paths = [r["path"] for r in read_shard(stats.paths[-1])]
    assert 0.02 < stats.valid / stats.kept < 0.1
    assert len({p.split("/")[0] for p in valid_paths}) > 10


def test_every_eligible_stdlib_file_is_kept_or_counted(corpus):
    _, stats = corpus
    eligible = stdlib_py_files()  # conftest's independent listing: 1 KiB..1 MiB, no site-packages
    assert stats.kept + stats.undecodable == len(eligible)
    assert stats.too_small > 0 and stats.too_large == 0


def test_deterministic_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.py").write_text("x = 1\n" * 400)
    (src / "a.py").write_text("y = 2\n" * 400)
    (src / "small.py").write_text("z = 3\n")
    (src / "bad.py").write_bytes(b"s = '\xff'\n" * 200)
    (src / "notes.txt").write_text("n" * 2000)
    first = make_corpus(tmp_path / "one", sources=[src], samples_per_file=1, validation_fraction=0.0,
                        show_progress=False)
    second = make_corpus(tmp_path / "two", sources=[src], samples_per_file=1, validation_fraction=0.0,
                         show_progress=False)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [read_shard(p)[0]["path"] for p in first] == ["a.py", "b.py"]
    stats = build_corpus(tmp_path / "three", sources=[src], validation_fraction=0.0, show_progress=False)
    assert (stats.kept, stats.too_small, stats.undecodable) == (2, 1, 1)


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_corpus(tmp_path / "o", sources=[tmp_path / "missing"], show_progress=False)
    with pytest.raises(UserError, match="no .py files"):
        build_corpus(tmp_path / "o", sources=[tmp_path], show_progress=False)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.py").write_text("x = 1\n" * 400)
    build_corpus(tmp_path / "o", sources=[tmp_path / "s"], validation_fraction=0.0, show_progress=False)
    with pytest.raises(UserError, match="already holds shards"):
        build_corpus(tmp_path / "o", sources=[tmp_path / "s"], show_progress=False)


def test_cli_and_shards_reader(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text(f"value_{i} = {i}\n" * 200)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "minicodeparrot", "make-corpus", "--output", str(out),
                           "--source", str(src), "--samples-per-file", "2", "--validation-fraction", "0",
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "5 files kept" in proc.stdout
    from minicodeparrot.sources.shards import iter_texts

    assert sorted(iter_texts(out / "train")) == sorted((src / f"m{i}.py").read_text() for i in range(5))
    bad = subprocess.run([sys.executable, "-m", "minicodeparrot", "make-corpus", "--output", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "already holds shards" in bad.stderr
