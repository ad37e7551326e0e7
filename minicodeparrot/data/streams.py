"""Virtual data streams: the same global batches on any number of GPUs, and exact resume on any of them.

A preempted 8-GPU job may come back on 4 GPUs. If each rank's data position were stored per rank (rank 3
has read these files up to here), 4 ranks could not continue what 8 were reading. So the training data
is divided into a fixed number S of *virtual streams* when the run starts, and never re-divided:

    stream s = the files (or lines) dealt to consumer s of S -> record shuffle -> packing -> block shuffle

Every optimizer step takes the same number of blocks, m = G / S, from every stream, where G is the global
batch (sequences per optimizer step). So the step's global batch is "the next m blocks of each of the S
streams" -- a definition that does not mention ranks. Ranks only decide who computes what:

    rank r of W owns the streams s with s % W == r       (S/W streams, so W must divide S)
    its step rows = its streams' m blocks each, in stream order: G/W sequences
    split into k micro-batches of b sequences              (k = G / (W * b): gradient accumulation)

A checkpoint stores each stream's state (`Pipeline.state_dict`), not each rank's. On resume with W'
ranks, rank r' takes the states of its streams s % W' == r' wherever they were saved, and the run goes on
with the very same global batches: only the split over ranks and micro-batches, hence the float
summation order, differs. Data workers within a rank split its streams again (each worker a contiguous run
of the rank's streams); since rows stay in stream order, the worker count changes nothing
at all: resume with any N is bit-exact.

The default S is G itself (every stream gives one block per step), which allows any W' that divides G.
Buffers are sized per stream from the run's first world size, so memory per rank stays as it was
configured for that world size (a rank holding twice the streams holds twice the buffers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from minicodeparrot.data.loader import Loader
from minicodeparrot.data.packing import ConstantLengthDataset
from minicodeparrot.data.pipeline import Pipeline, PipelineMirror, block_dtype
from minicodeparrot.data.pretokenize import TokenShardDataset, check_shard_packing
from minicodeparrot.errors import UserError
from minicodeparrot.sources.shards import ShardStream

STATE_VERSION = 2  # 1 was the per-rank (share) state, before virtual streams


@dataclass(frozen=True)
class DataLayout:
    """How the data is divided, fixed for the whole run: S streams, G sequences per step, buffer sizes.

    `record_buffer` and `sequence_buffer` are per stream.
    """

    streams: int
    global_batch: int
    record_buffer: int
    sequence_buffer: int

    @property
    def blocks_per_stream(self) -> int:
        return self.global_batch // self.streams

    def to_dict(self) -> dict:
        return asdict(self)


def new_layout(global_batch: int, world_size: int, streams: int | None, record_shuffle_buffer: int,
               sequence_shuffle_buffer: int) -> DataLayout:
    """The layout a new run starts with; buffer sizes are per rank in the config, per stream here."""
    streams = streams or global_batch
    if global_batch % streams or streams % world_size:
        raise UserError(f"--data-streams {streams} must divide the global batch ({global_batch} sequences "
                        f"per step) and be a multiple of the number of ranks ({world_size})")
    per_rank = streams // world_size
    return DataLayout(streams, global_batch, math.ceil(record_shuffle_buffer / per_rank),
                      math.ceil(sequence_shuffle_buffer / per_rank) if sequence_shuffle_buffer > 1 else 0)


def accumulation_steps(layout: DataLayout, world_size: int, micro_batch: int) -> int:
    """k such that k micro-batches of `micro_batch` on each of `world_size` ranks make the global batch."""
    if layout.streams % world_size:
        raise UserError(f"the run's data is divided into {layout.streams} streams, which {world_size} ranks "
                        f"cannot share evenly; use a number of ranks that divides {layout.streams}")
    per_rank = layout.global_batch // world_size
    if per_rank % micro_batch:
        fits = [b for b in range(1, per_rank + 1) if per_rank % b == 0]
        raise UserError(f"the run's global batch is {layout.global_batch} sequences per step, "
                        f"{per_rank} per rank on {world_size} ranks, which --train-batch-size {micro_batch} "
                        f"does not divide; use one of {fits}")
    return per_rank // micro_batch


def rank_streams(layout: DataLayout, rank: int, world_size: int) -> list[int]:
    """The streams rank `rank` of `world_size` computes: every W-th, starting at its own number."""
    return list(range(rank, layout.streams, world_size))


# --- one stream, and a group of them ---------------------------------------------------------------------
def build_stream(dataset: Any, tokenizer: Any, stream: int, layout: DataLayout, *, seq_length: int, seed: int,
                 tokenized: bool = False, text_field: str = "content", encode_workers: int | None = None,
                 packing: str = "concat") -> Pipeline:
    """Stream `stream` of the layout: its files or lines, shuffled, packed into blocks, shuffled again.

    It is exactly the old per-rank pipeline of "consumer `stream` of S": seeds depend on the stream
    number only, so the stream is the same whoever computes it. `packing`: "concat" or "per-file"
    (packing.py); token shards must have been written with the same.
    """
    if tokenized:
        check_shard_packing(dataset, packing, seq_length)
        source = TokenShardDataset(dataset, seq_length=seq_length, rank=stream, world_size=layout.streams,
                                   seed=seed, infinite=True)
        # The windows are already a global permutation: a sequence buffer would only cost memory.
        return Pipeline(source, 0, "", block_dtype(vocab_size=source.vocab_size), seq_length)
    records = ShardStream(dataset, split_by_rank=True, seed=seed, text_field=text_field, rank=stream,
                          world_size=layout.streams, shuffle_buffer=layout.record_buffer)
    packed = ConstantLengthDataset(tokenizer, records, seq_length=seq_length, infinite=True,
                                   text_field=text_field, num_workers=encode_workers, packing=packing)
    return Pipeline(packed, layout.sequence_buffer, f"sequences-{seed}-{stream}", block_dtype(tokenizer),
                    seq_length)


class StreamGroup:
    """Some streams of one rank, run together by one data worker (or by the trainer itself).

    Iterating `units()` yields one array per optimizer step: the next m blocks of each stream, in stream
    order. State and deltas are dicts keyed by stream number, so they can be dealt to other workers.
    """

    def __init__(self, make_stream, streams: list[int], blocks_per_stream: int):
        self.streams, self.m = streams, blocks_per_stream
        self.pipelines = {s: make_stream(s) for s in streams}

    def units(self, batch_size: int = 0) -> Iterator[np.ndarray]:
        iterators = {s: iter(p) for s, p in self.pipelines.items()}
        while True:
            rows = [next(iterators[s]) for s in self.streams for _ in range(self.m)]
            yield np.stack(rows)

    def state_dict(self) -> dict:
        return {s: p.state_dict() for s, p in self.pipelines.items()}

    def load_state_dict(self, states: dict) -> None:
        for s, p in self.pipelines.items():
            if states.get(s) is not None:
                p.load_state_dict(states[s])

    def start_journal(self) -> None:
        for p in self.pipelines.values():
            p.start_journal()

    def delta(self) -> dict:
        return {s: p.delta() for s, p in self.pipelines.items()}

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.pipelines.values():
            for k, v in p.stats().items():
                total[k] = total.get(k, 0) + v
        return total


class GroupMirror:
    """The trainer's exact copy of one worker's StreamGroup state, kept from its deltas."""

    def __init__(self, states: dict | None, size: int, seq_length: int):
        states = states or {}
        self.mirrors = {s: PipelineMirror(state, size, seq_length) for s, state in states.items()}
        self.size, self.seq_length = size, seq_length

    def apply(self, delta: dict) -> None:
        for s, d in delta.items():
            if s not in self.mirrors:
                self.mirrors[s] = PipelineMirror(None, self.size, self.seq_length)
            self.mirrors[s].apply(d)

    def state_dict(self) -> dict:
        return {s: m.state_dict() for s, m in self.mirrors.items()}


def _make_group(worker: int, *, make_stream, worker_streams: list[list[int]], blocks_per_stream: int
                ) -> StreamGroup:
    return StreamGroup(make_stream, worker_streams[worker], blocks_per_stream)


# --- the training loader ---------------------------------------------------------------------------------
class TrainLoader:
    """This rank's endless micro-batches (LongTensor [b, seq_length] on `device`), step after step.

    Each step's G/W rows arrive as one array per data worker (its streams' blocks); they are put in
    stream order and cut into k micro-batches of b. `state_dict()` between steps is every stream's state
    after the last whole step taken, keyed by stream: any rank count and any worker count can load it.
    """

    def __init__(self, make_stream, layout: DataLayout, *, rank: int, world_size: int, micro_batch: int,
                 num_workers: int, prefetch: int, device: torch.device | str | None, seq_length: int):
        self.layout, self.rank, self.world_size = layout, rank, world_size
        self.micro_batch = micro_batch
        self.k = accumulation_steps(layout, world_size, micro_batch)
        self.streams = rank_streams(layout, rank, world_size)
        workers = min(num_workers, len(self.streams))  # a worker without a stream would idle
        # Contiguous runs of the rank's streams: the step's rows are then just the workers' units one after
        # the other, already in stream order (any split gives the same rows; this one costs no reordering).
        per = -(-len(self.streams) // max(1, workers))
        self.worker_streams = [self.streams[i:i + per] for i in range(0, len(self.streams), per)]
        workers = min(workers, len(self.worker_streams))
        make = partial(_make_group, make_stream=make_stream, worker_streams=self.worker_streams,
                       blocks_per_stream=layout.blocks_per_stream)
        widest = len(self.worker_streams[0])  # a worker's unit: its streams' blocks of one step
        self.inner = Loader(make, batch_size=widest * layout.blocks_per_stream, num_workers=workers,
                            prefetch=prefetch, device=device, endless=True, seq_length=seq_length,
                            sequence_buffer=layout.sequence_buffer, rank=rank, world_size=world_size,
                            mirror=GroupMirror, streams_per_unit=widest)
        self.device = self.inner.device
        self._pending: list[torch.Tensor] = []
        self.stats = self.inner.stats

    def _next_step_rows(self) -> torch.Tensor:
        """One step's rows of this rank in stream order (on the device): one unit per worker, in turn,
        each its contiguous run of streams in order."""
        units = [next(self.inner) for _ in self.worker_streams]
        return units[0] if len(units) == 1 else torch.cat(units)

    def __next__(self) -> torch.Tensor:
        if not self._pending:
            rows = self._next_step_rows()
            b = self.micro_batch
            self._pending = [rows[i * b:(i + 1) * b] for i in range(self.k)]
        return self._pending.pop(0)

    def stage(self, k: int) -> None:
        """Receive the next step's units now and start their copies to the device (see Loader.stage);
        the training loop calls it before its one wait for the GPU. `k`, the loop's micro-batches per
        step, is this loader's own `self.k`; a step is one unit from each worker."""
        self.inner.stage(len(self.worker_streams))

    def __iter__(self) -> TrainLoader:
        return self

    def state_dict(self) -> dict:
        """Every stream of this rank, after the last whole step (taken between optimizer steps only)."""
        if self._pending:
            raise RuntimeError("the data state is defined between optimizer steps, not inside one")
        merged: dict = {s: None for s in self.streams}  # None: a stream not started yet
        for states in self.inner.state_dict()["pipelines"]:
            merged.update(states or {})
        return {"version": STATE_VERSION, "layout": self.layout.to_dict(), "streams": merged}

    def load_state_dict(self, state: dict) -> None:
        """Continue from the stream states in `state` (this rank's streams must all be there)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(stateless_checkpoint_message())
        if DataLayout(**state["layout"]) != self.layout:
            raise UserError(f"the saved data layout {state['layout']} is not this run's "
                            f"{self.layout.to_dict()}; resume with the run's own data settings")
        missing = [s for s in self.streams if s not in state["streams"]]
        if missing:
            raise UserError(f"the checkpoint holds no state for data streams {missing[:5]}; a rank file is "
                            "missing or damaged: resume from an earlier complete checkpoint")
        self.inner.close()
        self.inner._start_states = [{s: state["streams"][s] for s in group} for group in self.worker_streams]
        self.inner._start_next = 0

    def close(self) -> None:
        """Stop the workers; iterating again continues where this left off (a step's remaining
        micro-batches first)."""
        self.inner.close()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stateless_checkpoint_message() -> str:
    return ("this checkpoint's data position was saved per rank by an older minicodeparrot, before data "
            "streams: continue it with the version that wrote it (same ranks and data workers), or start a "
            "new run in a new --output-dir")


def build_train_loader(dataset: Any, tokenizer: Any, layout: DataLayout, *, seq_length: int, seed: int,
                       micro_batch: int, tokenized: bool = False, rank: int = 0, world_size: int = 1,
                       text_field: str = "content", num_workers: int = 0, prefetch: int = 4,
                       device: torch.device | str | None = None, packing: str = "concat") -> TrainLoader:
    """This rank's endless training micro-batches over its streams of `layout`."""
    make_stream = partial(build_stream, dataset, tokenizer, layout=layout, seq_length=seq_length, seed=seed,
                          tokenized=tokenized, text_field=text_field, packing=packing,
                          encode_workers=1 if num_workers else None)
    return TrainLoader(make_stream, layout, rank=rank, world_size=world_size, micro_batch=micro_batch,
                       num_workers=num_workers, prefetch=prefetch, device=device, seq_length=seq_length)
