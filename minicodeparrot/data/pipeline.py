"""What training and validation batches are made of: one part of the data, read -> pack -> shuffle.

For training the part is a virtual stream (`streams.py`: stream s of S, whoever computes it); for
validation it is a *share*, what one reader sees: rank r of R with N data workers per rank has R*N
shares, and worker w of rank r reads share r*N + w (`shards.consumer_index`'s numbering), so the
shares are disjoint and together cover the data. One part's pipeline is

    ShardStream (files dealt to this share, records through a record ShuffleBuffer)
      -> ConstantLengthDataset (documents joined with EOS, tokenized, cut into seq_length blocks;
                                or, per-file, each document cut alone)
      -> Pipeline (blocks through a sequence ShuffleBuffer)

or, for `--tokenized` shards, TokenShardDataset windows (already permuted globally) -> Pipeline without a
shuffle. `loader.py` runs pipelines in data workers (or in the training process) and turns blocks into
batches.

Blocks are stored as uint16 while the vocabulary fits (GPT-2's 50,257 ids, CodeParrot's 32,768): the
sequence buffer is then 10,000 x 1024 x 2 bytes = 20 MB per rank, in memory and in the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicodeparrot.data.packing import ConstantLengthDataset
from minicodeparrot.data.pretokenize import TokenShardDataset, check_shard_packing, token_dtype
from minicodeparrot.errors import UserError
from minicodeparrot.sources.shards import ShardStream, Source, resolve_sources
from minicodeparrot.sources.shuffle import ShuffleBuffer


def validation_sources(spec: Any) -> list[Source]:
    """The shards of `spec`; when it names several and some are codeparrot validation shards
    (`file-..._validation.json.gz`, as make-corpus writes them), only those: evaluating on the
    training shards as well would report a loss the model was trained on."""
    sources = resolve_sources(spec)
    valid = [s for s in sources if "validation" in Path(s.name).name]
    return valid if len(sources) > 1 and valid else sources


class Pipeline:
    """One share's blocks: a block source (packer or token windows) through a sequence ShuffleBuffer.

    Iterating yields numpy blocks of `dtype` (uint16 when the vocabulary fits). `state_dict()` is the
    position right after the last block yielded: the source's own state plus the buffer. For the data
    loader, `delta()` says what changed since the previous call in a few kilobytes (the buffer's slot
    writes, not the whole 20 MB buffer), and `PipelineMirror` rebuilds the full state from those.
    """

    def __init__(self, source: Any, sequence_shuffle_buffer: int, seed: str, dtype: np.dtype,
                 seq_length: int):
        self.source, self.dtype, self.seq_length = source, np.dtype(dtype), seq_length
        self.buffer = ShuffleBuffer(sequence_shuffle_buffer, seed)
        self._sent: dict = {}

    def __iter__(self) -> Iterator[np.ndarray]:
        limit = np.iinfo(self.dtype).max
        for block in self.source:
            block = block.numpy()
            if block.max(initial=0) > limit:
                raise UserError(f"token id {int(block.max())} does not fit the {self.dtype} blocks chosen "
                                "from the vocabulary size; the tokenizer's ids are not 0..len(vocab)-1")
            out = self.buffer.push(block.astype(self.dtype))
            if out is not None:
                yield out
        yield from self.buffer.drain()

    def units(self, batch_size: int) -> Iterator[np.ndarray]:
        """Blocks stacked `batch_size` at a time (the last batch of finite data may be shorter): what a
        data worker sends."""
        rows = []
        for block in self:
            rows.append(block)
            if len(rows) == batch_size:
                yield np.stack(rows)
                rows = []
        if rows:
            yield np.stack(rows)

    def stats(self) -> dict[str, int]:
        """Counters for reports: bad records skipped and tokens dropped by packing, in this share."""
        src = self.source
        inner = getattr(src, "dataset", None)
        return {"bad_records": inner.bad_records.total if isinstance(inner, ShardStream) else 0,
                "tokens_total": getattr(src, "tokens_total", 0),
                "tokens_dropped": getattr(src, "tokens_dropped", 0)}

    # -- state ---------------------------------------------------------------------------------------
    def _encode(self, items: list[np.ndarray]) -> torch.Tensor:
        if not items:
            return torch.from_numpy(np.empty((0, self.seq_length), dtype=self.dtype))
        return torch.from_numpy(np.stack(items))

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "sequences": self.buffer.state_dict(encode=self._encode)}

    def load_state_dict(self, state: dict) -> None:
        seq = state["sequences"]
        if seq["size"] != self.buffer.size or tuple(seq["items"].shape[1:]) not in ((self.seq_length,), ()):
            raise UserError(f"the saved data state has a sequence shuffle buffer of {seq['size']} x "
                            f"{tuple(seq['items'].shape[1:])} tokens, this run {self.buffer.size} x "
                            f"{self.seq_length}; resume with the same buffer size, seq_length and "
                            "data workers")
        self.source.load_state_dict(state["source"])
        self.buffer.load_state_dict(seq, decode=lambda t: list(t.numpy().astype(self.dtype, copy=False)))

    def start_journal(self) -> None:
        self.buffer.journal = []

    def delta(self) -> dict:
        """What changed since the last call: the source's state (its entries that are still the very
        same objects -- e.g. the packer's snapshot of the record buffer -- named, not resent), the
        buffer's slot writes and its RNG state."""
        source = self.source.state_dict()
        kept = [k for k, v in source.items() if k in self._sent and self._sent[k] is v]
        self._sent = source
        writes = self.buffer.take_journal() or []
        blocks = np.stack([block for _, block in writes]) if writes else None  # one array pickles fastest
        return {"source": {k: v for k, v in source.items() if k not in kept}, "kept": kept,
                "slots": [slot for slot, _ in writes], "blocks": blocks, "rng": rng_words(self.buffer.rng)}


def rng_words(rng: random.Random) -> np.ndarray:
    """A `random.Random`'s state as 625 uint32 words: the Mersenne Twister's 624 and its position.

    `getstate()` gives them as a tuple of 625 Python ints, which take ~40 us to unpickle; as one array
    they cross to the loader as 2.5 kB of raw bytes. `rng_state` turns them back into `getstate()`'s form.
    """
    version, words, gauss_next = rng.getstate()
    assert version == 3 and gauss_next is None, "a shuffle buffer draws no gauss(); CPython's state is v3"
    return np.array(words, dtype=np.uint32)


def rng_state(words: np.ndarray) -> tuple:
    return (3, tuple(words.tolist()), None)


class PipelineMirror:
    """The loader's exact copy of a worker's pipeline state, kept from its deltas (see `Pipeline.delta`).

    `state` is the state the worker started from (None: a fresh start); `size` its sequence buffer size.
    """

    def __init__(self, state: dict | None, size: int, seq_length: int):
        self.start, self.size, self.seq_length = state, size, seq_length
        self.source: dict | None = None
        self.rng = None
        self.items: np.ndarray | None = None  # allocated at the first write, in the blocks' dtype
        self.count = 0
        if state is not None and len(state["sequences"]["items"]):
            saved = state["sequences"]["items"].numpy()
            self._allocate(saved.dtype)
            self.count = len(saved)
            self.items[:self.count] = saved

    def _allocate(self, dtype: np.dtype) -> None:
        self.items = np.zeros((self.size, self.seq_length), dtype=dtype)

    def apply(self, delta: dict) -> None:
        source = {k: self.source[k] for k in delta["kept"]}  # a worker's first delta keeps nothing
        source.update(delta["source"])
        self.source, self.rng = source, delta["rng"]  # as words: converted only for a checkpoint
        for slot, block in zip(delta["slots"], delta["blocks"] if delta["slots"] else [], strict=True):
            if self.items is None:
                self._allocate(block.dtype)
            self.items[slot] = block  # in order: a slot written twice keeps the later block
            self.count = max(self.count, slot + 1)

    def state_dict(self) -> dict | None:
        if self.source is None:
            return self.start  # no batch taken from this worker since it started
        items = (np.empty((0, self.seq_length), dtype=np.uint16) if self.items is None
                 else self.items[:self.count].copy())
        return {"source": self.source,
                "sequences": {"size": self.size, "items": torch.from_numpy(items), "rng": rng_state(self.rng),
                              "draining": False}}


def block_dtype(tokenizer: Any = None, vocab_size: int | None = None) -> np.dtype:
    """uint16 while every id fits, else int32 (ids are non-negative and < 2**31)."""
    if vocab_size is None:
        vocab_size = max(len(tokenizer), tokenizer.eos_token_id + 1)
    return np.dtype(np.uint16) if token_dtype(vocab_size).itemsize == 2 else np.dtype(np.int32)


def build_valid_data(dataset: Any, tokenizer: Any, *, seq_length: int, tokenized: bool = False,
                     rank: int = 0, world_size: int = 1, text_field: str = "content", worker: int = 0,
                     workers: int = 1, encode_workers: int | None = None,
                     packing: str = "concat") -> Pipeline:
    """This share's part of the validation set, in file order, read once (for `train` and `evaluate-loss`).

    Of several shard files, only those named *validation* are used if there are any (`validation_sources`).
    """
    share, shares = rank * workers + worker, world_size * workers
    if tokenized:
        check_shard_packing(dataset, packing, seq_length)
        source = TokenShardDataset(dataset, seq_length=seq_length, rank=share, world_size=shares,
                                   shuffle=False, infinite=False)
        return Pipeline(source, 0, "", block_dtype(vocab_size=source.vocab_size), seq_length)
    stream = ShardStream(validation_sources(dataset), split_by_rank=True, shuffle_files=False,
                         text_field=text_field, rank=share, world_size=shares)
    packed = ConstantLengthDataset(tokenizer, stream, seq_length=seq_length, infinite=False,
                                   text_field=text_field, num_workers=encode_workers, packing=packing)
    return Pipeline(packed, 0, "", block_dtype(tokenizer), seq_length)
