"""A real Python corpus on every machine: the interpreter's standard library as codeparrot shards.

`transformersbook/codeparrot` is 50 GB of gzipped JSON lines; the quickstart and the tests need
something that has the same format and is real code, but is already on disk. The running
interpreter's standard library is that: about 1,400 `.py` files (30 MB) of idiomatic Python.

Layout written by `make_corpus(DIR)` (mirrors `codeparrot-train` / `codeparrot-valid`):

    DIR/train/file-000000000000.json.gz  ... file-0000000000NN.json.gz
    DIR/valid/file-0000000000MM_validation.json.gz      (MM = NN + 1: the last shard)

so `--dataset-name-train DIR/train --dataset-name-valid DIR/valid` selects the splits. Each shard
is gzipped JSON lines with the dataset's fields `repo_name, path, copies, size, content, license`
(`copies` and `size` are strings, as in the original). Only `.py` files of 1 KiB to 1 MiB are kept,
like the CodeParrot filters; skipped files are counted and reported, never silently dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from minicodeparrot.errors import UserError
from minicodeparrot.sources.shards import ShardFileWriter

MIN_BYTES = 1024
MAX_BYTES = 1 << 20
# Directories that hold installed third-party packages, not the standard library.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class CorpusStats:
    """What `make_corpus` kept and what it skipped (and why)."""

    kept: int = 0
    train: int = 0
    valid: int = 0
    too_small: int = 0
    too_large: int = 0
    undecodable: int = 0
    paths: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.kept} files kept ({self.train} train, {self.valid} validation) in "
                f"{len(self.paths)} shards; skipped {self.too_small} < {MIN_BYTES} B, "
                f"{self.too_large} > {MAX_BYTES} B, {self.undecodable} not UTF-8")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(source: Path) -> list[tuple[Path, str]]:
    """(file, path relative to its source) for every `.py` file, in sorted (deterministic) order."""
    if source.is_file():
        return [(source, source.name)]
    if not source.is_dir():
        raise UserError(f"corpus source {source} does not exist; pass an existing file or directory")
    files = sorted(p for p in source.rglob("*.py") if p.is_file() and not _EXCLUDED_PARTS & set(p.parts))
    return [(p, p.relative_to(source).as_posix()) for p in files]


def _is_validation(repo_name: str, rel_path: str, fraction: float) -> bool:
    # A hash of the name, not the position in the sorted list: taking the last files would make the
    # validation set all `xml/` and `zoneinfo/`; a hash spreads it and is stable when files are added.
    h = int.from_bytes(hashlib.md5(f"{repo_name}/{rel_path}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _write_shard(path: Path, records: list[dict]) -> None:
    shard = ShardFileWriter(path)
    for rec in records:
        shard.write(rec)
    shard.close()


def build_corpus(output_dir: str | Path, sources: list[str | Path] | None = None,
                 samples_per_file: int = 200, validation_fraction: float = 0.05,
                 show_progress: bool = True) -> CorpusStats:
    """Write the shards and return the statistics (see the module docstring for the layout)."""
    if samples_per_file < 1:
        raise UserError(f"--samples-per-file must be at least 1, got {samples_per_file}")
    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    output_dir = Path(output_dir)
    old = sorted(output_dir.glob("train/file-*.json.gz")) + sorted(output_dir.glob("valid/file-*.json.gz"))
    if old:
        raise UserError(f"{output_dir} already holds shards ({old[0].name}); choose an empty --output")

    if sources:
        roots = [Path(s) for s in sources]
        names = [f"local/{r.resolve().name}" for r in roots]
        licenses = ["unknown"] * len(roots)
    else:
        roots = [stdlib_root()]
        names = [f"python/cpython-{sys.version_info.major}.{sys.version_info.minor}-Lib"]
        licenses = ["psf-2.0"]

    stats = CorpusStats()
    train: list[dict] = []
    valid: list[dict] = []
    todo = [(f, rel, name, lic) for root, name, lic in zip(roots, names, licenses, strict=True)
            for f, rel in _python_files(root)]
    for f, rel, name, lic in tqdm(todo, desc="make-corpus", unit="file", disable=not show_progress):
        size = f.stat().st_size
        if size < MIN_BYTES:
            stats.too_small += 1
            continue
        if size > MAX_BYTES:
            stats.too_large += 1
            continue
        try:
            content = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats.undecodable += 1
            continue
        rec = {"repo_name": name, "path": rel, "copies": "1", "size": str(size),
               "content": content, "license": lic}
        (valid if _is_validation(name, rel, validation_fraction) else train).append(rec)
    if not train:
        raise UserError("no .py files of 1 KiB-1 MiB in the corpus sources; pass --source DIR with code")
    stats.kept, stats.train, stats.valid = len(train) + len(valid), len(train), len(valid)

    for i in range(0, len(train), samples_per_file):
        path = output_dir / "train" / f"file-{i // samples_per_file:012d}.json.gz"
        _write_shard(path, train[i:i + samples_per_file])
        stats.paths.append(path)
    if valid:
        path = output_dir / "valid" / f"file-{len(stats.paths):012d}_validation.json.gz"
        _write_shard(path, valid)
        stats.paths.append(path)
    return stats


def make_corpus(output_dir: str | Path, sources: list[str | Path] | None = None, samples_per_file: int = 200,
                validation_fraction: float = 0.05, show_progress: bool = True) -> list[Path]:
    """Write codeparrot-format shards; return their paths, the validation shard last.

    The summary of kept and skipped files goes to stderr (nothing is skipped silently).
    """
    stats = build_corpus(output_dir, sources, samples_per_file, validation_fraction, show_progress)
    print(f"make-corpus: {stats.summary()}", file=sys.stderr)
    return stats.paths


def make_corpus_command(args: argparse.Namespace) -> None:
    """`minicodeparrot make-corpus`: the shards, and where to point training at them."""
    stats = build_corpus(args.output, args.source, args.samples_per_file, args.validation_fraction,
                         show_progress=not args.no_progress)
    print(f"make-corpus: {stats.summary()}")
    print(f"train: {args.output}/train   validation: {args.output}/valid")
