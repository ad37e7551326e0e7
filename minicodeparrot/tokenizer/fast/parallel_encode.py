"""A speed path for many texts: encode them in worker processes, results in input order.

The encoder is pure Python, so threads would share one interpreter lock; processes do not.
Each worker gets the tokenizer once (pickled without its word cache) and then contiguous chunks of
texts of about equal size, a few chunks per worker so that a slow chunk does not hold up the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence

# Below this many characters in total, texts are encoded in-process: starting worker processes
# (and sending them the vocab) costs more than it saves.
PARALLEL_MIN_CHARS = 1 << 20

Encode = Callable[..., list[int]]  # a bound Tokenizer.encode
_encode: Encode | None = None


def _init(encode: Encode) -> None:
    # Forked workers inherit the parent's signal handlers. The trainer's SIGTERM handler only sets a
    # "stop after this step" flag, so inherited, it makes Pool.terminate() (which sends SIGTERM) wait
    # forever for a worker that will not stop. Workers take the default action instead, and leave
    # Ctrl-C to the parent, which stops the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _encode
    _encode = encode


def _encode_chunk(args: tuple[list[str], bool]) -> list[list[int]]:
    texts, parse_special = args
    return [_encode(t, parse_special=parse_special) for t in texts]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encode_batch(encode: Encode, texts: Sequence[str], num_workers: int | None = None,
                 parse_special: bool = True) -> list[list[int]]:
    """`[encode(t) for t in texts]`, split over `num_workers` processes when the batch is large."""
    texts = list(texts)
    if num_workers is None:
        num_workers = min(cpu_count(), 8)
    total = sum(map(len, texts))
    # Daemonic processes (e.g. a torch DataLoader's workers) may not have children: encode in-process there.
    in_daemon = multiprocessing.current_process().daemon
    if num_workers <= 1 or len(texts) < 2 or total < PARALLEL_MIN_CHARS or in_daemon:
        return [encode(t, parse_special=parse_special) for t in texts]
    target = total / (num_workers * 4)
    chunks: list[tuple[list[str], bool]] = []
    cur: list[str] = []
    size = 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= target:
            chunks.append((cur, parse_special))
            cur, size = [], 0
    if cur:
        chunks.append((cur, parse_special))
    with multiprocessing.get_context().Pool(num_workers, initializer=_init, initargs=(encode,)) as pool:
        return [ids for chunk in pool.imap(_encode_chunk, chunks) for ids in chunk]
