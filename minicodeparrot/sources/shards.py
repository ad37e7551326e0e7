"""Streaming reader for JSON-lines shards (codeparrot format), local or on the Hugging Face Hub.

A CodeParrot shard is a gzip-compressed JSON-lines file, one record per line:
{"repo_name", "path", "copies", "size", "content", "license"}. The full training set is ~180 GB
uncompressed, so nothing here ever holds a whole file in memory: gzip is decompressed on the fly
and records are parsed one line at a time.

`ShardStream` is the record stream for training. Under DDP each rank -- and inside a rank each
data worker (data/loader.py) -- is one *consumer*; consumers must see disjoint parts of the data that together
cover all of it. With at least as many files as consumers, files are dealt round-robin (cheap: a
consumer only decompresses its own files). With fewer files than consumers every consumer reads all
files and keeps every C-th line, because otherwise some consumers would get nothing at all.

Bad input (a line that is not JSON, a record without the text field, a truncated gzip file) is
never dropped silently: it is counted in `BadRecords`, reported as a `BadRecordWarning` naming the
file and line, and with `strict=True` it is fatal.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
import random
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from minicodeparrot.dist import rank_and_world
from minicodeparrot.errors import UserError
from minicodeparrot.sources.shuffle import ShuffleBuffer

DATA_SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")
# `owner/name` optionally followed by `@revision`: the Hub's repo id syntax.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
CHUNK = 1 << 20
MAX_WARNINGS = 20  # per stream; the totals are still counted and summarised at the end


class BadRecordError(UserError):
    """A malformed record or file, raised instead of a warning when strict=True."""


class BadRecordWarning(UserWarning):
    """A malformed record or file that was skipped (and counted)."""


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """One shard file: a local path, or a file in a Hub repo (opened lazily over HTTP)."""

    name: str  # what messages show: the local path, or hub://owner/name/path
    path: Path | None = None
    repo_id: str | None = None
    hub_path: str | None = None
    revision: str = "main"
    size: int | None = None  # from the Hub listing, used to detect truncated downloads

    def open(self) -> BinaryIO:
        if self.path is not None:
            return open(self.path, "rb")
        from minicodeparrot.sources import hub

        return hub.open_stream(self.repo_id, self.hub_path, revision=self.revision, expected_size=self.size)


def _hub_sources(spec: str) -> list[Source]:
    from minicodeparrot.sources import hub

    repo, _, revision = spec.partition("@")
    files = [f for f in hub.list_files(repo, revision=revision or "main") if is_data_file(f.path)]
    if not files:
        raise UserError(f"Hub dataset {repo} has no .json/.jsonl(.gz) data files; check the repo name")
    return [Source(f"hub://{repo}/{f.path}", repo_id=repo, hub_path=f.path, revision=revision or "main",
                   size=f.size) for f in files]


def resolve_sources(spec: str | os.PathLike | Source | Iterable) -> list[Source]:
    """Expand a dataset spec into shard files, in a deterministic order.

    spec: a file, a directory (its data files, recursively, sorted by path), a glob, `hub://owner/name`
    or a bare `owner/name` that is not a local path (both with an optional `@revision`), or a list of these.
    """
    if isinstance(spec, Source):
        return [spec]
    if not isinstance(spec, (str, os.PathLike)):
        out = [s for item in spec for s in resolve_sources(item)]
        if not out:
            raise UserError("empty dataset list; give at least one file, directory or Hub repo")
        return out
    text = os.fspath(spec)
    if text.startswith("hub://"):
        return _hub_sources(text[len("hub://"):])
    path = Path(text).expanduser()
    if path.is_file():
        return [Source(str(path), path=path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p.name))
        if not files:
            raise UserError(f"directory {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        return [Source(str(p), path=p) for p in files]
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in files if p.is_file() and is_data_file(p.name)]
        if not files:
            raise UserError(f"no data files match {text!r}")
        return [Source(str(p), path=p) for p in files]
    if _REPO_ID.match(text) and not text.startswith((".", "/")):
        from minicodeparrot.sources.hub import HubError

        try:
            return _hub_sources(text)
        except HubError as e:  # maybe it was meant as a local path: say that it is not one either
            raise type(e)(f"{e} ({text!r} is not a local path either)") from None
    raise UserError(f"dataset {text!r} is neither a local file/directory/glob nor a Hub repo (owner/name)")


@dataclass
class BadRecords:
    """Counts of skipped input; `str()` is the one-line summary printed at the end."""

    not_json: int = 0
    missing_field: int = 0
    truncated_files: int = 0
    warned: int = field(default=0, repr=False)

    @property
    def total(self) -> int:
        return self.not_json + self.missing_field + self.truncated_files

    def __str__(self) -> str:
        return (f"{self.not_json} lines not JSON, {self.missing_field} records without the text field, "
                f"{self.truncated_files} truncated/corrupt files")

    def as_dict(self) -> dict[str, int]:
        return {"not_json": self.not_json, "missing_field": self.missing_field,
                "truncated_files": self.truncated_files}


def _report(stats: BadRecords, kind: str, message: str, strict: bool) -> None:
    if strict:
        raise BadRecordError(f"{message} (strict mode; drop --strict to skip and count bad records)")
    setattr(stats, kind, getattr(stats, kind) + 1)
    stats.warned += 1
    if stats.warned <= MAX_WARNINGS:
        warnings.warn(f"skipped: {message}", BadRecordWarning, stacklevel=3)
    elif stats.warned == MAX_WARNINGS + 1:
        warnings.warn("further bad records are counted but not shown", BadRecordWarning, stacklevel=3)


def _chunks(source: Source) -> Iterator[bytes]:
    """The file's bytes in pieces of about a MiB, gunzipped on the fly for .gz files.

    We drive zlib ourselves instead of using GzipFile: on a truncated file GzipFile raises and loses
    the data it had already decompressed into its buffers, while here every complete line before the
    cut is still delivered before EOFError is raised.
    """
    with source.open() as raw:
        if not source.name.endswith(".gz"):
            while chunk := raw.read(CHUNK):
                yield chunk
            return
        inflater, fed = zlib.decompressobj(wbits=31), False  # wbits=31: expect a gzip header
        while chunk := raw.read(CHUNK // 4):
            while chunk:
                fed = True
                if out := inflater.decompress(chunk):
                    yield out
                chunk = b""
                if inflater.eof:  # end of one gzip member; concatenated members may follow
                    chunk = inflater.unused_data.lstrip(b"\0")
                    inflater, fed = zlib.decompressobj(wbits=31), False
        if fed:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _iter_lines(source: Source, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(line_index, raw line) of a shard from line `start` on.

    Raises EOFError/zlib.error for a truncated or corrupt gzip file, after the lines before the damage.
    """
    chunks = _chunks(source)
    first = next(chunks, b"")
    if first.lstrip().startswith(b"["):
        # A .json file holding one JSON array (not JSON lines): parsed whole, so small files only.
        items = json.loads(first + b"".join(chunks))
        for i, item in enumerate(items[start:], start):
            yield i, json.dumps(item).encode()
        return
    i, tail = 0, b""
    for chunk in itertools.chain([first], chunks):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if i >= start:
                yield i, line
            i += 1
    if tail.strip() and i >= start:
        yield i, tail


def _parse(line: bytes, where: str, text_field: str, stats: BadRecords, strict: bool) -> dict | None:
    if not line.strip():
        return None  # blank lines (e.g. a trailing newline) are not records
    try:
        record = json.loads(line)
    except ValueError:
        _report(stats, "not_json", f"{where}: line is not JSON", strict)
        return None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        _report(stats, "missing_field", f"{where}: record has no string field {text_field!r}", strict)
        return None
    return record


_GZIP_ERRORS = (EOFError, zlib.error, ValueError)  # ValueError: a .json array that does not parse


def _read_file(source: Source, text_field: str, stats: BadRecords, strict: bool, start: int = 0,
               stride: int = 1, phase: int = 0, report_truncation: bool = True
               ) -> Iterator[tuple[int, dict | None]]:
    """Yield (line_index, record) for the lines with (line_index - phase) % stride == 0.

    `record` is None for a bad line owned by this reader (already counted), so that callers that track
    positions still advance past it.
    """
    line_no = start
    try:
        for line_no, line in _iter_lines(source, start):
            if (line_no - phase) % stride == 0:
                yield line_no, _parse(line, f"{source.name}:{line_no + 1}", text_field, stats, strict)
    except _GZIP_ERRORS as e:
        if report_truncation:
            _report(stats, "truncated_files",
                    f"{source.name}: truncated or corrupt after line {line_no + 1} ({type(e).__name__}: {e})",
                    strict)


def iter_records(sources: Any, text_field: str = "content", strict: bool = False,
                 stats: BadRecords | None = None) -> Iterator[dict]:
    """Every good record of the sources, in order. Bad records are counted into `stats` and warned about."""
    stats = stats if stats is not None else BadRecords()
    for source in resolve_sources(sources):
        for _, record in _read_file(source, text_field, stats, strict):
            if record is not None:
                yield record
    if stats.total:
        warnings.warn(f"skipped {stats.total} bad records in total: {stats}", BadRecordWarning, stacklevel=2)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The objects of one local JSON-lines file (.jsonl, or .jsonl.gz) that must be read whole and
    exactly -- HumanEval problems, a samples file, a staging file -- so, unlike `iter_records`, a bad
    line is an error naming it, not a record to skip and count."""
    source = Source(str(path), path=Path(path))
    try:
        for i, line in _iter_lines(source):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError's msg leaves out its own "line 1 column ..."
                why = getattr(e, "msg", e)
                raise UserError(f"{source.name}:{i + 1} is not valid JSON ({why}); "
                                "expected one object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{source.name}:{i + 1} is not a JSON object; expected one object per line")
            yield record
    except (EOFError, zlib.error) as e:
        raise UserError(f"{source.name} is truncated or corrupt ({e}); fetch or write it again") from None


def iter_texts(spec: Any, n: int | None = None, text_field: str = "content") -> Iterator[str]:
    """The text field of the first `n` records (all when n is None): the input for tokenizer training."""
    for i, record in enumerate(iter_records(spec, text_field=text_field)):
        if n is not None and i >= n:
            return
        yield record[text_field]


class ShardFileWriter:
    """Write one codeparrot-format shard: gzipped JSON lines, one record per line.

    The file is written under a `.tmp` name and renamed when closed, so a crash never leaves a
    truncated shard that looks complete to a later reader. mtime=0 in the gzip header makes the same
    records give identical bytes; level 6 (as the original's compress step) is ~3x faster than the
    default 9 for files ~1% larger. `surrogatepass` keeps lone surrogates that JSON input may carry.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 -- closed in close()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6, mtime=0)
        self.count = 0

    def write(self, record: dict) -> None:
        self._gz.write(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
        self.count += 1

    def close(self) -> Path:
        self._gz.close()
        self._raw.close()
        self._tmp.replace(self.path)
        return self.path


def consumer_index(split_by_rank: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(this consumer's id, number of consumers) over DDP ranks x workers of a torch DataLoader.

    Every data-parallel reader must see a disjoint part: with 2 ranks x 3 workers there are 6 readers,
    and reader r*3+w is worker w of rank r. Explicit `rank`/`world_size` override the environment. Our
    own data workers (data/loader.py) pass their share as `rank`/`world_size`; the torch DataLoader case
    is kept for users who wrap a ShardStream in one.
    """
    r, world = 0, 1
    if split_by_rank:
        r, world = rank_and_world()
        r = rank if rank is not None else r
        world = world_size if world_size is not None else world
    if not 0 <= r < world:
        raise UserError(f"rank {r} is outside world size {world}; check RANK/WORLD_SIZE")
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return r * workers + worker, world * workers


class ShardStream(torch.utils.data.IterableDataset):
    """Records of the shards for one DDP rank / data worker, with seeded shuffling and exact resume.

    Shuffling follows `datasets`: the file order is shuffled with seed+epoch, then the records pass a
    `shuffle.ShuffleBuffer` of `shuffle_buffer` records.
    All ranks shuffle the file list with the same seed, so the round-robin deal stays disjoint.
    Ranks get whole files, so their record counts differ: under DDP train on an endless stream with a
    step budget (as CodeParrot does), not "until the data runs out", which would leave ranks waiting.

    `state_dict()` is the position right after the last record handed out by the iterator running in
    this process: epoch, file, line within the file, the shuffle buffer and its RNG state. The buffer is
    stored as references (file, line), not as records: 10,000 real source files are ~100 MB of text, and
    a checkpoint per rank must stay small; resuming re-reads those lines (mostly from the last one or two
    files, since a record rarely survives many thousand replacements). In a worker process the
    iteration happens in the worker's copy of this object, so the main process cannot see it:
    data/loader.py carries the state back with every batch.
    """

    def __init__(self, sources: Any, split_by_rank: bool = True, seed: int = 0, shuffle_files: bool = True,
                 shuffle_buffer: int = 0, text_field: str = "content", strict: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.sources = resolve_sources(sources)
        self.split_by_rank = split_by_rank
        self.seed = seed
        self.shuffle_files = shuffle_files
        self.shuffle_buffer = shuffle_buffer
        self.text_field = text_field
        self.strict = strict
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.bad_records = BadRecords()
        self._pos: dict | None = None  # live position of the running iterator
        self._buffer: ShuffleBuffer | None = None
        self._resume: dict | None = None  # position to start the next iteration from

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new pass (call before each epoch, as with DistributedSampler)."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None  # a saved position inside another epoch no longer applies
        self.epoch = epoch

    def _plan(self, epoch: int, consumer: int, consumers: int) -> tuple[list[int], int]:
        """This consumer's file indices for the epoch, and the line stride (1: whole files)."""
        order = list(range(len(self.sources)))
        if self.shuffle_files:
            random.Random(f"files-{self.seed}-{epoch}").shuffle(order)
        if len(order) >= consumers:
            return order[consumer::consumers], 1
        return order, consumers

    def _refs(self, items: list[tuple[int, int, dict]]) -> torch.Tensor:
        # (file, line, length of the text): the length catches most edits of the data between runs.
        rows = [(src, line, len(record[self.text_field])) for src, line, record in items]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    def _reread(self, refs: torch.Tensor) -> list[tuple[int, int, dict]]:
        """The buffered records of a saved state, read again from their files."""
        wanted: dict[int, set[int]] = {}
        for src, line, _ in refs.tolist():
            wanted.setdefault(src, set()).add(line)
        found: dict[tuple[int, int], dict] = {}
        for src, lines in sorted(wanted.items()):
            source, need = self.sources[src], set(lines)
            reader = _iter_lines(source, min(need))
            try:
                for line_no, line in reader:
                    if line_no in need:
                        where = f"{source.name}:{line_no + 1}"
                        record = _parse(line, where, self.text_field, BadRecords(), strict=False)
                        if record is not None:
                            found[(src, line_no)] = record
                        need.discard(line_no)
                        if not need:
                            break
            except _GZIP_ERRORS:
                pass  # reported below as missing records
            finally:
                reader.close()
        items = []
        for src, line, length in refs.tolist():
            if len(found.get((src, line), {}).get(self.text_field, "")) != length:
                raise UserError(f"cannot resume: {self.sources[src].name} line {line + 1} is no longer the "
                                "record the checkpoint refers to; resume on the unchanged dataset")
            items.append((src, line, found[(src, line)]))
        return items

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers = consumer_index(self.split_by_rank, self.rank, self.world_size)
        state, self._resume = self._resume, None
        if state is not None and (state["consumer"], state["consumers"]) != (consumer, consumers):
            raise UserError(f"resume state is for consumer {state['consumer']} of {state['consumers']}, "
                            f"but this is consumer {consumer} of {consumers}; resume with the same world "
                            "size and number of data workers")
        if state is not None and (state["sources"], state["buffer"]["size"]) != (len(self.sources),
                                                                               self.shuffle_buffer):
            raise UserError(f"resume state is for {state['sources']} shard files and a record shuffle buffer "
                            f"of {state['buffer']['size']}, but this stream has {len(self.sources)} and "
                            f"{self.shuffle_buffer}; resume with the same dataset and buffer size")
        epoch = self.epoch if state is None else state["epoch"]
        buffer = ShuffleBuffer(self.shuffle_buffer, f"buffer-{self.seed}-{epoch}-{consumer}")
        pos = {"epoch": epoch, "consumer": consumer, "consumers": consumers, "file": 0, "line": 0}
        if state is not None:
            pos.update(file=state["file"], line=state["line"])
            buffer.load_state_dict(state["buffer"], decode=self._reread)
        self.epoch = epoch
        # The live position: this generator updates `pos` (and the buffer) before every yield, so that
        # state_dict() taken between two records describes exactly the records still to come.
        self._pos, self._buffer = pos, buffer
        files, stride = self._plan(epoch, consumer, consumers)
        while pos["file"] < len(files) and not buffer.draining:
            src = files[pos["file"]]
            # Striding: line l of the k-th file belongs to consumer (l + k) % stride, so that the
            # leftover lines of many small files do not all land on consumer 0.
            phase = (consumer - pos["file"]) % stride
            for line_no, record in _read_file(self.sources[src], self.text_field, self.bad_records,
                                              self.strict, start=pos["line"], stride=stride, phase=phase,
                                              report_truncation=phase == 0):
                pos["line"] = line_no + 1
                if record is None:
                    continue
                out = buffer.push((src, line_no, record))
                if out is not None:
                    yield out[2]
            pos["file"] += 1
            pos["line"] = 0
        for item in buffer.drain():
            yield item[2]
        if self.bad_records.total:
            bad = self.bad_records
            warnings.warn(f"ShardStream skipped {bad.total} bad records so far: {bad}", BadRecordWarning,
                          stacklevel=2)

    def state_dict(self) -> dict:
        """The position after the last record yielded in this process (see the class docstring)."""
        if self._resume is not None:
            return dict(self._resume)
        if self._pos is None:
            return {"epoch": self.epoch, "fresh": True}
        return dict(self._pos, buffer=self._buffer.state_dict(encode=self._refs), sources=len(self.sources),
                    bad_records=self.bad_records.as_dict())

    def load_state_dict(self, state: dict) -> None:
        if state.get("fresh"):
            self.epoch, self._resume = state["epoch"], None
            return
        self._resume = dict(state)
        self.epoch = state["epoch"]
        self.bad_records = BadRecords(**state.get("bad_records", {}))
