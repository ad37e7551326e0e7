"""Training input off the critical path: persistent data workers with exact resume.

N worker processes per rank live for the whole run, each running its part of the data (for training
a `streams.StreamGroup`, some of the rank's virtual streams; for validation one share's `Pipeline`)
and sending whole units (a step's rows, a batch) ahead through a bounded prefetch. The consumer takes
units round-robin from the workers, so the order is deterministic. N = 0 runs the same pipelines in the
training process (then the tokenizer starts a process pool per packing buffer).

Why not `torch.utils.data.DataLoader`: its workers restart every epoch (cold word caches), and it
cannot say what state a checkpoint should hold, because the workers run ahead of the batches the loop
has consumed. Here, as in torchdata's StatefulDataLoader, each batch travels with its worker's pipeline
state right after it, so `state_dict()` is exactly the state after the last batch the consumer took.
Sending the whole state with every batch would mean 20 MB of sequence buffer per batch; a worker sends
the buffer's slot writes instead, and the consumer keeps an exact mirror of each worker's state
(`data.PipelineMirror`, a few kB per batch).

Receiving must cost the training process next to nothing: at 40 steps/s, 0.4 ms per batch is 2% of a
GPU's time. So the bytes do not go through the pipe: each worker has a ring of `prefetch` shared-memory
slots, and a message's arrays (the batch, the new buffer blocks, the shuffle RNG's state) are written
into the next slot (pickle protocol 5 hands them over out of band). The pipe carries only the rest, a few
hundred bytes, and its end-of-file still tells the consumer that a worker died. A worker writes a slot
only after taking a credit, which the consumer gives back once it has copied the slot out, so both walk
the ring in the same order and never touch the same slot at once. The training loop also calls
`stage(n)` before it waits for the GPU, so the next step's batches are received (and on their way to the
device) while the GPU still works.

Workers are started with `spawn` (a fresh interpreter: nothing of the trainer's CUDA, threads or signal
handlers is inherited), run in a session of their own (so the signals that torchrun and Ctrl-C send to the
trainer's process group reach the trainer only, which finishes its step and checkpoints), reset SIGTERM to
its default and ignore SIGINT, and die with the trainer (PR_SET_PDEATHSIG on Linux, a
parent-pid watchdog elsewhere). A worker that fails or is killed ends the consumer's next wait with a
one-line UserError naming the worker and the cause, and the other workers are stopped.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from minicodeparrot.data.pipeline import Pipeline, PipelineMirror, build_valid_data
from minicodeparrot.errors import UserError

STATE_VERSION = 1
_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 1 << 20  # Linux's default limit for unprivileged processes: ~15 batches of 12 x 1024
_ALIGN = 64  # each array in a slot starts on a cache line


def _slot_bytes(batch_size: int, seq_length: int, streams: int = 1) -> int:
    # The int64 batch and as many new sequence-buffer blocks (once the buffer is full, one block enters
    # per block that leaves; int32 at most), and 4 kB for the buffer's RNG state and alignment. Only the
    # first batch after a (re)start is bigger (it carries the whole filling buffer): it takes the pipe.
    return batch_size * seq_length * (8 + 4) + 4096 * streams


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of arrays of `sizes` bytes laid out back to back on _ALIGN boundaries, and the end."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // _ALIGN) * _ALIGN
    return offsets, end


def _describe(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _detach_from_trainer(parent_pid: int) -> None:
    # A session of its own: torchrun stops a run by signalling each trainer's whole process group, and a
    # worker in that group would die at once, maybe before the trainer has taken the batches of the step
    # it finishes before checkpointing. Out of the group, the worker lives until the trainer closes it or
    # dies; a signal sent to the worker itself still ends it (and the run, in one line).
    os.setsid()
    # Lower priority: when the trainer wakes up for its next batch it must get a core at once, not queue
    # behind workers that are tokenizing ahead (they have prefetched batches to spare).
    os.nice(10)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # Note: the signal comes when the *thread* that started us ends; the loader is built on the main one.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def _post(conn, credits, slot: np.ndarray, message: tuple) -> None:
    """Send `message`: its arrays into `slot` when they fit (else everything through the pipe)."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = [r.nbytes for r in raws]
    offsets, end = _layout(sizes)
    credits.acquire()  # at most `prefetch` messages wait for the consumer; this slot is free again
    if end <= len(slot):
        for offset, raw in zip(offsets, raws, strict=True):
            slot[offset:offset + raw.nbytes] = np.frombuffer(raw, dtype=np.uint8)
        conn.send_bytes(pickle.dumps((head, sizes)))
    else:
        conn.send_bytes(pickle.dumps((pickle.dumps(message, protocol=5), None)))


def _worker_main(index: int, make: Callable[..., Pipeline], state: dict | None, batch_size: int, conn,
                 credits, ring: torch.Tensor, parent_pid: int) -> None:
    _detach_from_trainer(parent_pid)
    slots = itertools.cycle(ring.numpy())  # the consumer walks the same ring in the same order
    try:
        pipeline = make(worker=index)
        if state is not None:
            pipeline.load_state_dict(state)
        pipeline.start_journal()
        for batch in pipeline.units(batch_size):
            # Converted to int64 (what the model's embedding takes) here, off the trainer's critical path.
            _post(conn, credits, next(slots), ("batch", batch.astype(np.int64), pipeline.delta()))
        _post(conn, credits, next(slots), ("end", pipeline.stats()))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the consumer closed the loader
    except BaseException as e:  # noqa: BLE001 -- every failure must reach the consumer as one line
        try:
            _post(conn, credits, next(slots), ("error", _describe(e)))
        except OSError:
            pass
    finally:
        conn.close()


def _stop_workers(procs: list, conns: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    for c in conns:
        c.close()


class Loader:
    """Batches (LongTensor [batch_size, seq_length] on `device`) from `num_workers` pipelines.

    `make(worker=w)` builds worker w's pipeline. Endless for training (`endless=True`); otherwise every
    worker's share is read once and iteration ends (a new `iter()` reads it again). A context manager:
    `close()` stops the workers (also done when the loader is garbage collected or the process exits).
    `stage(n)` receives the next n batches ahead (see there).
    """

    def __init__(self, make: Callable[..., Pipeline], *, batch_size: int, num_workers: int, prefetch: int,
                 device: torch.device | str | None, endless: bool, seq_length: int, sequence_buffer: int,
                 rank: int, world_size: int, mirror: Callable[..., Any] = PipelineMirror,
                 streams_per_unit: int = 1):
        if batch_size < 1 or num_workers < 0 or prefetch < 1:
            raise UserError("batch size and prefetch must be at least 1, and data workers at least 0")
        self.make, self.batch_size, self.num_workers, self.prefetch = make, batch_size, num_workers, prefetch
        self.device = torch.device(device or "cpu")
        self.endless, self.seq_length, self.sequence_buffer = endless, seq_length, sequence_buffer
        self.rank, self.world_size, self.mirror = rank, world_size, mirror
        self.streams_per_unit = streams_per_unit  # each stream's state change adds its RNG state to a slot
        self.shares = max(1, num_workers)
        self.stats: dict[str, int] = {}
        self._start_states: list[dict | None] = [None] * self.shares
        self._start_next = 0
        self._running = False
        self._staged: deque[tuple[int, torch.Tensor, dict]] = deque()  # (worker, batch, its state change)
        # State changes of batches already taken, not yet applied to the mirrors: applying them is
        # Python work per stream that the step need not wait for, so it runs in stage() (while the GPU
        # computes) or when the state is asked for. At most one step's worth waits here.
        self._taken: list[tuple[int, dict]] = []
        self._failure: UserError | None = None  # met while staging, raised when a batch is missing

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The pipeline states right after the last batch taken, and whose turn is next. Plain tensors,
        ints, tuples and None: `torch.save`-able and loadable with weights_only=True."""
        if not self._running:
            pipelines, nxt = list(self._start_states), self._start_next
        elif self.num_workers == 0:
            pipelines, nxt = [self._pipeline.state_dict()], 0
        else:
            # Staged batches are not taken yet: the mirrors do not hold their changes, and the first one's
            # worker is the one whose turn it is.
            nxt = self._staged[0][0] if self._staged else self._active[self._turn]
            self._apply_taken()
            pipelines = [m.state_dict() for m in self._mirrors]
        return {"version": STATE_VERSION, "world_size": self.world_size, "rank": self.rank,
                "shares": self.shares, "next": nxt, "pipelines": pipelines}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch at which `state` was taken (from a loader of the same data)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"the data state has version {state.get('version')}, this minicodeparrot reads "
                            f"{STATE_VERSION}; resume with the version that wrote the checkpoint")
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise UserError(f"the data state is rank {state['rank']}'s of {state['world_size']}, this is "
                            f"rank {self.rank} of {self.world_size}; resume with the same number of ranks")
        if state["shares"] != self.shares:
            saved = "0 or 1" if state["shares"] == 1 else str(state["shares"])
            raise UserError(f"the checkpoint's data state was written with --data-workers {saved}, this run "
                            f"has {self.num_workers}; each worker reads its own share of the files, so "
                            f"resume with --data-workers {saved}")
        self.close()
        self._failure = None
        self._start_states, self._start_next = list(state["pipelines"]), state["next"]

    # -- workers -----------------------------------------------------------------------------------
    def _start(self) -> None:
        self._running = True
        if self.num_workers == 0:
            self._pipeline = self.make(worker=0)
            if self._start_states[0] is not None:
                self._pipeline.load_state_dict(self._start_states[0])
            self._batches = self._pipeline.units(self.batch_size)
            return
        ctx = mp.get_context("spawn")
        self._procs, self._conns, self._credits, self._mirrors, self._slots = [], [], [], [], []
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        for w in range(self.num_workers):
            reader, writer = ctx.Pipe(duplex=False)
            try:  # a larger pipe lets a worker post its prefetched batches without blocking on the consumer
                fcntl.fcntl(writer.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass
            credits = ctx.Semaphore(self.prefetch)
            # torch's shared memory goes to the spawned worker as a file descriptor and has no name in
            # /dev/shm, so nothing is left behind when the run is killed with -9.
            slot = _slot_bytes(self.batch_size, self.seq_length, self.streams_per_unit)
            ring = torch.empty((self.prefetch, slot), dtype=torch.uint8).share_memory_()
            proc = ctx.Process(target=_worker_main, name=f"data-worker-{self.rank}-{w}", daemon=True,
                               args=(w, self.make, self._start_states[w], self.batch_size, writer, credits,
                                     ring, os.getpid()))
            proc.start()
            writer.close()  # only the worker writes: its death then reads as end-of-file here
            self._procs.append(proc)
            self._conns.append(reader)
            self._credits.append(credits)
            self._slots.append(itertools.cycle(ring.numpy()))
            self._mirrors.append(self.mirror(self._start_states[w], self.sequence_buffer, self.seq_length))
        self._active = list(range(self.num_workers))  # workers whose share is not exhausted
        self._turn = self._start_next  # index into _active of the worker whose batch comes next

    def _died(self, w: int) -> UserError:
        proc = self._procs[w]
        proc.join(5)
        code = proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            cause = f"was killed by {name}" + (" (out of memory? the kernel's OOM killer sends SIGKILL)"
                                               if name == "SIGKILL" else "")
        else:
            cause = f"exited with status {code}" if code is not None else "stopped answering"
        self.close()
        return UserError(f"data worker {w} (pid {proc.pid}) of rank {self.rank} {cause}; the run cannot "
                         "go on without its data: fix the cause, then --resume-from-checkpoint latest")

    def _receive(self, w: int) -> tuple:
        """Worker w's next message, its arrays copied out of their slot, which goes back to the worker."""
        # No polling needed: only the worker holds the pipe's write end, so its death, even half-way
        # through a message, reads as end-of-file here.
        try:
            head, sizes = pickle.loads(self._conns[w].recv_bytes())
        except (EOFError, OSError):
            raise self._died(w) from None
        slot = next(self._slots[w])
        if sizes is None:
            message = pickle.loads(head)
        else:
            offsets, _ = _layout(sizes)
            arrays = [slot[o:o + n].copy() for o, n in zip(offsets, sizes, strict=True)]
            message = pickle.loads(head, buffers=arrays)
        self._credits[w].release()
        if message[0] == "error":
            self.close()
            raise UserError(f"data worker {w} of rank {self.rank} failed: {message[1]}")
        return message

    def _next_from_workers(self) -> tuple[int, torch.Tensor, dict]:
        """(worker, batch on the device, the worker's state change) of the next batch, in turn order."""
        while self._active:
            w = self._active[self._turn]
            message = self._receive(w)
            if message[0] == "end":
                for k, v in message[1].items():
                    self.stats[k] = self.stats.get(k, 0) + v
                del self._active[self._turn]  # the turn passes to the next worker
            else:
                self._turn += 1
            if self._active:
                self._turn %= len(self._active)
            if message[0] == "batch":
                return w, self._to_device(message[1]), message[2]
        self.close()
        raise StopIteration

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        tokens = torch.from_numpy(batch).to(torch.long)  # workers send int64; the in-process pipeline uint16
        if self.device.type == "cuda":
            # Through page-locked memory, from where the copy to the GPU runs asynchronously (from ordinary
            # memory it would make the host wait). torch's caching host allocator does not hand that memory
            # out again before the copy has finished.
            pinned = torch.empty(tokens.shape, dtype=torch.long, pin_memory=True)
            return pinned.copy_(tokens).to(self.device, non_blocking=True)
        return tokens

    def stage(self, n: int) -> None:
        """Receive the next `n` batches now and start their copies to the device, so that the next `n`
        `next()` calls return at once. The training loop calls this before it waits for the GPU: then
        receiving overlaps the GPU's work instead of following it. `state_dict()` still describes the
        batches returned by `next()`, not those staged, so a checkpoint taken in between is exact.

        A failure while staging is raised by the `next()` that finds no staged batch left, so the step in
        progress still completes. Only an endless loader with workers stages; otherwise this does nothing
        (an in-process pipeline's state cannot be taken back to before the staged batches).
        """
        if not self.endless or self.num_workers == 0 or self._failure is not None:
            return
        if not self._running:
            self._start()
        self._apply_taken()
        try:
            while len(self._staged) < n:
                self._staged.append(self._next_from_workers())
        except UserError as e:
            self._failure = e

    def __next__(self) -> torch.Tensor:
        if self._failure is not None and not self._staged:
            failure, self._failure = self._failure, None
            raise failure
        if not self._running:
            self._start()
        if self.num_workers == 0:
            try:
                return self._to_device(next(self._batches))
            except StopIteration:
                self.stats = self._pipeline.stats()
                self._running = False
                raise
        if not self._staged:
            self._staged.append(self._next_from_workers())
        w, batch, delta = self._staged.popleft()
        self._taken.append((w, delta))
        return batch

    def _apply_taken(self) -> None:
        for w, delta in self._taken:
            self._mirrors[w].apply(delta)
        self._taken.clear()

    def __iter__(self) -> Loader:
        if not self.endless and not self._running:
            self.stats = {}
        return self

    def close(self) -> None:
        """Stop the workers. An endless loader keeps its position: `state_dict()` still describes the
        last batch taken (e.g. for a checkpoint after a worker died), and iterating again continues."""
        if self._running and self.endless:
            state = self.state_dict()
            self._start_states, self._start_next = state["pipelines"], state["next"]
        if self._running and self.num_workers > 0:
            self._finalizer()
        self._staged.clear()  # their workers will make them again, from the state above
        self._taken.clear()  # applied by state_dict() above when the position matters
        self._running = False

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_valid_loader(dataset: Any, tokenizer: Any, *, seq_length: int, batch_size: int,
                       tokenized: bool = False, rank: int = 0, world_size: int = 1,
                       text_field: str = "content", num_workers: int = 0, prefetch: int = 4,
                       device: torch.device | str | None = None, packing: str = "concat") -> Loader:
    """This rank's validation batches: each worker's share read once, in a fixed order; the last batch of
    each share may be shorter. `loader.stats` then holds bad records skipped and tokens dropped."""
    make = partial(build_valid_data, dataset, tokenizer, seq_length=seq_length, tokenized=tokenized,
                   rank=rank, world_size=world_size, text_field=text_field, workers=max(1, num_workers),
                   encode_workers=1 if num_workers else None, packing=packing)
    return Loader(make, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch, device=device,
                  endless=False, seq_length=seq_length, sequence_buffer=0, rank=rank, world_size=world_size)
