"""Pretokenized binary shards: tokenize the corpus once, then train from a memory map.

On-the-fly packing re-tokenizes every document on every epoch in the data workers; a
pure-Python BPE does a few hundred thousand tokens per second per core, while one GPU step of
codeparrot-small eats ~100k tokens (docs/benchmarks.md). The CodeParrot scripts added a
pretokenized dataset for that reason. Here `pretokenize()` writes the whole token stream once
(documents joined by `<|endoftext|>`, like the packer) and `TokenShardDataset` reads `seq_length`
windows straight out of `np.memmap` -- no tokenizer, no JSON, nearly no CPU.

Shard layout (`DIR/tokens-000000.bin`, ...), all little-endian:

    offset  size  field
    0       8     magic  b"MCPTOKS\\0"
    8       4     uint32 format version (1)
    12      4     uint32 bytes per token: 2 (uint16, vocab <= 65536) or 4 (uint32)
    16      8     uint64 number of tokens N
    24      8     uint64 vocabulary size (checked against the model by the caller)
    32      N*2|4 the token ids

Windows never cross a shard boundary; the last `< seq_length` tokens of each shard are unused
(shards are large, so that is a negligible loss).

`--packing per-file` (the course's chunks, data/packing.py) writes only each file's full `seq_length`
chunks, back to back, in shards whose size is a multiple of `seq_length`: the windows are then exactly
the chunks. Since that only holds for the `seq_length` they were cut for, `DIR/packing.json` records
both, and training or evaluating with another packing or length is refused (`check_shard_packing`).
Shards without it are concat shards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from minicodeparrot.data.packing import PACKING_MODES, encode_documents, encode_per_file
from minicodeparrot.errors import UserError
from minicodeparrot.sources.shards import consumer_index

MAGIC = b"MCPTOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, number of tokens, vocab size
HEADER_SIZE = HEADER.size  # 32
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
CHUNK_CHARS = 1 << 18  # text per worker task: 256 KB, enough to amortise the IPC, small enough to balance


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50257, CodeParrot's 32768): half the disk and page cache."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


# -- writing -------------------------------------------------------------------------------------
class _ShardWriter:
    """Appends token arrays to `tokens-NNNNNN.bin` files of at most `tokens_per_shard` tokens each."""

    def __init__(self, output_dir: Path, dtype: np.dtype, vocab_size: int, tokens_per_shard: int):
        self.output_dir, self.dtype, self.vocab_size = output_dir, dtype, vocab_size
        self.tokens_per_shard = tokens_per_shard
        self.paths: list[Path] = []
        self.file = None
        self.count = 0
        self.total = 0

    def _open(self) -> None:
        path = self.output_dir / f"tokens-{len(self.paths):06d}.bin"
        self.paths.append(path)
        self.file = open(path.with_name(path.name + ".tmp"), "wb")
        self.file.write(b"\0" * HEADER_SIZE)  # the real header goes in when the count is known
        self.count = 0

    def _close(self) -> None:
        self.file.seek(0)
        self.file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab_size))
        self.file.close()
        tmp = self.paths[-1].with_name(self.paths[-1].name + ".tmp")
        tmp.replace(self.paths[-1])  # a shard that exists is complete
        self.file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                self._open()
            room = self.tokens_per_shard - self.count
            part, ids = ids[:room], ids[room:]
            self.file.write(part.astype(self.dtype, copy=False).tobytes())
            self.count += len(part)
            self.total += len(part)
            if self.count == self.tokens_per_shard:
                self._close()

    def finish(self) -> list[Path]:
        if self.file is not None:
            self._close()
        return self.paths


_worker_tokenizer = None
_worker_chunk_length: int | None = None  # per-file packing's seq_length; None: concat


def _init_worker(tokenizer, chunk_length: int | None = None) -> None:
    global _worker_tokenizer, _worker_chunk_length
    _worker_tokenizer, _worker_chunk_length = tokenizer, chunk_length


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, int]:
    """(ids to write, tokens the tokenizer produced). The packer's own functions (packing.py), in this
    long-lived pool worker's process: the pool lives for the whole job so each worker's word cache stays
    warm, where a pool per chunk (encode_batch's, for large batches) would start cold every time."""
    if _worker_chunk_length is not None:
        return encode_per_file(_worker_tokenizer, texts, _worker_chunk_length, num_workers=1)
    ids = encode_documents(_worker_tokenizer, texts, num_workers=1)
    return ids, len(ids)


def _chunks(records: Iterator[dict], text_field: str, counter: list[int]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for record in records:
        chunk.append(record[text_field])
        chars += len(chunk[-1])
        counter[0] += 1
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def pretokenize(dataset: Any, tokenizer, output_dir: str | Path, num_workers: int = 1,
                tokens_per_shard: int = 100_000_000, text_field: str = "content",
                show_progress: bool = True, packing: str = "concat", seq_length: int | None = None) -> dict:
    """Tokenize every record of `dataset` (a shards spec) into binary shards; return a summary dict.

    Chunks of documents are encoded in `num_workers` processes and written back in input order, so
    the shards are identical for any worker count. `packing="per-file"` needs `seq_length`.
    """
    from minicodeparrot.sources.shards import BadRecords, iter_records, resolve_sources

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no <|endoftext|> token; pretokenize needs it between documents")
    if tokens_per_shard < 1 or num_workers < 1:
        raise UserError("--tokens-per-shard and --num-workers must be at least 1")
    chunk_length = _chunk_length(packing, seq_length, tokens_per_shard)
    if chunk_length is not None:  # windows must not straddle two shards
        tokens_per_shard -= tokens_per_shard % chunk_length
    sources = resolve_sources(dataset)  # a wrong --dataset fails here, before any output exists
    output_dir = Path(output_dir)
    if output_dir.is_dir() and any(output_dir.glob("tokens-*.bin")):
        raise UserError(f"{output_dir} already holds token shards; choose an empty --output")
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = max(max(tokenizer.vocab.values()), tokenizer.eos_token_id) + 1  # ids are < vocab_size
    writer = _ShardWriter(output_dir, token_dtype(vocab_size), vocab_size, tokens_per_shard)
    if chunk_length is not None:
        (output_dir / "packing.json").write_text(json.dumps({"packing": packing, "seq_length": seq_length}))
    bad, records, produced = BadRecords(), [0], 0
    chunks = _chunks(iter_records(sources, text_field=text_field, stats=bad), text_field, records)
    start = time.perf_counter()
    bar = tqdm(desc="pretokenize", unit="tok", unit_scale=True, disable=not show_progress)
    if num_workers == 1:
        _init_worker(tokenizer, chunk_length)
        results: Iterator[tuple[np.ndarray, int]] = map(_encode_chunk, chunks)
        pool = None
    else:
        pool = multiprocessing.get_context().Pool(num_workers, _init_worker, (tokenizer, chunk_length))
        results = pool.imap(_encode_chunk, chunks)  # imap keeps the input order
    try:
        for ids, n_tokens in results:
            writer.write(ids)
            produced += n_tokens
            bar.update(len(ids))
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    paths = writer.finish()
    seconds = time.perf_counter() - start
    if not paths:
        raise UserError(f"no records with a '{text_field}' field in {dataset}; nothing to pretokenize")
    return {"shards": paths, "records": records[0], "tokens": writer.total, "bad_records": bad,
            "seconds": seconds, "records_per_s": records[0] / seconds, "dtype": writer.dtype.name,
            "packing": packing, "tokens_dropped": produced - writer.total}


def _chunk_length(packing: str, seq_length: int | None, tokens_per_shard: int) -> int | None:
    """The per-file chunk length, None for concat; one line for an impossible combination."""
    if packing not in PACKING_MODES:
        raise UserError(f"unknown --packing {packing!r}; choose one of {', '.join(PACKING_MODES)}")
    if packing == "concat":
        return None
    if seq_length is None or seq_length < 1:
        raise UserError("--packing per-file cuts each file into --seq-length chunks: give --seq-length N")
    if tokens_per_shard < seq_length:
        raise UserError(f"--tokens-per-shard {tokens_per_shard} is smaller than one --seq-length "
                        f"{seq_length} chunk; raise it")
    return seq_length


def shard_packing(spec: str | Path | list) -> dict:
    """How the shards of `spec` were packed: DIR/packing.json, or concat when there is none."""
    paths = _shard_paths(spec)
    recorded = paths[0].parent / "packing.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())
    return {"packing": "concat", "seq_length": None}


def check_shard_packing(spec: str | Path | list, packing: str, seq_length: int) -> None:
    """Per-file shards hold chunks of one length: reading them with another length or as concat shards
    would make windows that straddle two files; concat shards read per-file would not be per-file."""
    saved = shard_packing(spec)
    if saved["packing"] != packing:
        raise UserError(f"the token shards in {spec} were written with --packing {saved['packing']}, this "
                        f"run has --packing {packing}; use the same, or pretokenize again")
    if packing == "per-file" and saved["seq_length"] != seq_length:
        raise UserError(f"the token shards in {spec} hold per-file chunks of {saved['seq_length']} tokens, "
                        f"this run has --seq-length {seq_length}; use the same, or pretokenize again")


# -- reading -------------------------------------------------------------------------------------
def read_header(path: str | Path) -> tuple[np.dtype, int, int]:
    """(dtype, number of tokens, vocab size) of a shard; a `UserError` naming the file if malformed."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    rerun = "re-run `minicodeparrot pretokenize`"
    if len(raw) < HEADER_SIZE:
        raise UserError(f"{path} is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte token-shard "
                        f"header; the file is truncated or not a token shard -- {rerun}")
    if raw[:8] != MAGIC:
        raise UserError(f"{path} is not a minicodeparrot token shard (bad magic); create it with "
                        "`minicodeparrot pretokenize`")
    _, version, itemsize, n_tokens, vocab_size = HEADER.unpack(raw)
    if version != VERSION:
        raise UserError(f"{path} has token-shard format version {version}; this minicodeparrot reads "
                        f"version {VERSION} -- {rerun}")
    if itemsize not in _DTYPES:
        raise UserError(f"{path} declares {itemsize} bytes per token (expected 2 or 4); the file is corrupt")
    expected, size = HEADER_SIZE + n_tokens * itemsize, path.stat().st_size
    if size < expected:
        raise UserError(f"{path} is {size} bytes but its header promises {expected}; the file is truncated "
                        f"-- {rerun}")
    if size > expected:
        raise UserError(f"{path} is {size} bytes, {size - expected} more than its header promises; the file "
                        f"is corrupt (or another write appended to it) -- {rerun}")
    return _DTYPES[itemsize], n_tokens, vocab_size


def _shard_paths(spec: str | Path | list) -> list[Path]:
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _shard_paths(s)]
    path = Path(spec)
    if path.is_dir():
        paths = sorted(path.glob("tokens-*.bin"))
        if not paths:
            raise UserError(f"{path} holds no tokens-*.bin shards; run `minicodeparrot pretokenize`")
        return paths
    if path.is_file():
        return [path]
    raise UserError(f"token shards {path} not found; pass the --output of `minicodeparrot pretokenize`")


def check_token_shards(spec: str | Path | list, vocab_size: int) -> None:
    """Shards to train on must come from this tokenizer: a larger id would crash the embedding lookup (on
    CUDA as an opaque device-side assert), a different tokenizer would train on nonsense."""
    for path in _shard_paths(spec):
        vocab = read_header(path)[2]
        if vocab != vocab_size:
            raise UserError(f"{path} was tokenized with a vocabulary of {vocab} tokens but --tokenizer has "
                            f"{vocab_size}; pass the tokenizer it was made with, or run "
                            "`minicodeparrot pretokenize` again with this one")


class TokenShardDataset(IterableDataset):
    """`LongTensor(seq_length)` windows from pretokenized shards, for DDP ranks and data workers.

    The windows are the non-overlapping `seq_length` blocks of each shard. Each epoch, all consumers
    (rank x worker) draw the same seeded permutation of all windows and consumer c of C takes
    positions c, c+C, ...: disjoint, and together everything except the last `total % C` windows,
    which are dropped so that every rank runs the same number of steps (a rank with one batch more
    would wait forever in all-reduce).

    `state_dict()`/`load_state_dict()` resume exactly (epoch and windows taken) when iterated in the
    main process; reading a memory map needs no worker processes, so `num_workers=0` costs nothing.
    """

    def __init__(self, path: str | Path | list, seq_length: int = 1024, seed: int = 0, shuffle: bool = True,
                 infinite: bool = False, split_by_rank: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        if seq_length < 1:
            raise UserError(f"seq_length must be at least 1, got {seq_length}")
        self.paths = _shard_paths(path)
        self.seq_length, self.seed, self.shuffle, self.infinite = seq_length, seed, shuffle, infinite
        self.split_by_rank, self.rank, self.world_size = split_by_rank, rank, world_size
        headers = [read_header(p) for p in self.paths]
        if len({h[2] for h in headers}) > 1:
            raise UserError(f"the token shards in {path} come from tokenizers with different vocabularies "
                            f"({sorted({h[2] for h in headers})}); pretokenize all data with one tokenizer")
        self.vocab_size = headers[0][2]
        self.num_tokens = sum(h[1] for h in headers)
        self._dtypes = [h[0] for h in headers]
        self._ntok = [h[1] for h in headers]
        # First global window index of each shard.
        self._starts = np.cumsum([0] + [n // seq_length for n in self._ntok])
        self.num_windows = int(self._starts[-1])
        if self.num_windows == 0:
            raise UserError(f"the token shards hold {self.num_tokens} tokens, fewer than one window of "
                            f"{seq_length}; use more data or a smaller seq_length")
        self.epoch = 0
        self._maps: list[np.memmap] | None = None  # opened lazily in the process that iterates
        self._position = {"epoch": 0, "taken": 0}
        self._resume: dict | None = None

    def __getstate__(self) -> dict:
        # Data workers started with spawn get a pickled copy: send paths, not mapped arrays.
        return dict(self.__dict__, _maps=None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def windows(self, epoch: int, consumer: int, consumers: int) -> np.ndarray:
        """Global window indices for one consumer in one epoch, in the order they are yielded."""
        if self.num_windows < consumers:
            raise UserError(f"{self.num_windows} windows cannot feed {consumers} consumers (ranks x workers)")
        order = np.arange(self.num_windows)
        if self.shuffle:
            # One global permutation (8 bytes per window: ~230 MB per consumer for CodeParrot's 29B
            # tokens) so that every batch mixes the whole corpus, not one shard at a time.
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        per_consumer = self.num_windows // consumers
        return order[consumer::consumers][:per_consumer]

    def window(self, index: int) -> torch.Tensor:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=d, mode="r", offset=HEADER_SIZE, shape=(n,))
                          for p, d, n in zip(self.paths, self._dtypes, self._ntok, strict=True)]
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        start = (index - int(self._starts[shard])) * self.seq_length
        return torch.from_numpy(self._maps[shard][start:start + self.seq_length].astype(np.int64))

    def state_dict(self) -> dict:
        return {**self._position, "seed": self.seed, "seq_length": self.seq_length,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.seed, self.seq_length, self.num_windows)
        if (state.get("seed"), state.get("seq_length"), state.get("num_windows")) != mine:
            raise UserError("the saved data position is for other token shards, seed or seq_length; "
                            "resume with the same --tokenized data, seed and sequence length")
        self._resume = {"epoch": state["epoch"], "taken": state["taken"]}

    def __iter__(self) -> Iterator[torch.Tensor]:
        consumer, consumers = consumer_index(self.split_by_rank, self.rank, self.world_size)
        resume, self._resume = self._resume, None
        epoch, skip = (resume["epoch"], resume["taken"]) if resume else (self.epoch, 0)
        while True:
            self.epoch = epoch
            indices = self.windows(epoch, consumer, consumers)
            for taken in range(skip, len(indices)):
                self._position = {"epoch": epoch, "taken": taken + 1}
                yield self.window(int(indices[taken]))
            if not self.infinite:
                return
            epoch, skip = epoch + 1, 0
            self._position = {"epoch": epoch, "taken": 0}


def print_summary(summary: dict, file=sys.stdout) -> None:
    dropped = (f", {summary['tokens_dropped']} tokens of short file tails dropped"
               if summary.get("packing") == "per-file" else "")
    print(f"pretokenize: {summary['records']} records -> {summary['tokens']} tokens ({summary['dtype']}) in "
          f"{len(summary['shards'])} shards{dropped}, {summary['records_per_s']:.0f} records/s; "
          f"skipped {summary['bad_records'].total} bad records ({summary['bad_records']})", file=file)


def pretokenize_command(args: argparse.Namespace) -> None:
    """`minicodeparrot pretokenize`: tokenize --dataset into token shards under --output."""
    from minicodeparrot.tokenizer.bpe import Tokenizer

    summary = pretokenize(args.dataset, Tokenizer.from_pretrained(args.tokenizer), args.output,
                          num_workers=args.num_workers, tokens_per_shard=args.tokens_per_shard,
                          text_field=args.text_field, show_progress=not args.no_progress,
                          packing=args.packing, seq_length=args.seq_length)
    print_summary(summary)
