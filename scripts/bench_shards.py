"""Shard-reading throughput: MB/s of uncompressed `content` for our reader vs a plain gzip+json loop.

    python scripts/bench_shards.py [--files 600] [--shards 6] [--repeat 3]

Writes codeparrot-format .json.gz shards of standard-library files to a temp dir, then reads them
(best of --repeat) with:
  baseline       `gzip.open(path)` + `json.loads` per line (what any script would write; `datasets` is
                 not a dependency, so this is the reference measured in the same run)
  iter_records   minicodeparrot.shards.iter_records
  ShardStream    with shuffle_files and a 1000-record shuffle buffer
  hub loopback   iter_records over tests/hubserver.py on 127.0.0.1 (HTTP, redirect, streaming gunzip)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import stdlib_texts  # noqa: E402
from hubserver import HubServer, write_shards  # noqa: E402

from minicodeparrot import shards  # noqa: E402


def baseline(paths: list[Path]) -> int:
    n = 0
    for path in paths:
        with gzip.open(path, "rb") as f:
            for line in f:
                n += len(json.loads(line)["content"])
    return n


def ours(records) -> int:
    return sum(len(r["content"]) for r in records)


def best(fn, repeat: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - start)
    return min(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=600, help="stdlib files in the corpus")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    texts = stdlib_texts(args.files)
    content_mb = sum(len(t.encode()) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp) / "data", texts, n_files=args.shards)
        gz_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"corpus: {len(texts)} files, {content_mb:.1f} MB content, {args.shards} shards, "
              f"{gz_mb:.1f} MB gzip")
        runs = {
            "baseline gzip+json": lambda: baseline(paths),
            "iter_records": lambda: ours(shards.iter_records(paths)),
            "ShardStream (shuffle 1000)": lambda: ours(shards.ShardStream(paths, shuffle_buffer=1000)),
        }
        results = {}
        for name, fn in runs.items():
            seconds, _ = best(fn, args.repeat)
            results[name] = content_mb / seconds
        with HubServer(datasets={"bench/stdlib": Path(tmp) / "data"}) as server:
            os.environ["HF_ENDPOINT"] = server.url
            os.environ.pop("HF_TOKEN", None)
            seconds, _ = best(lambda: ours(shards.iter_records("hub://bench/stdlib")), args.repeat)
            results["iter_records over loopback Hub"] = content_mb / seconds
    base = results["baseline gzip+json"]
    for name, mbps in results.items():
        print(f"{name:32s} {mbps:8.1f} MB/s   ratio vs baseline {mbps / base:5.2f}")


if __name__ == "__main__":
    main()
