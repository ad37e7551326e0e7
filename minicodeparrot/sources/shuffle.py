"""The streaming shuffle buffer, used twice: for records (shards.ShardStream) and for packed sequences.

A stream cannot be permuted, so it is shuffled locally, the way `datasets`' `.shuffle(buffer_size)` does
it for the CodeParrot scripts: fill a buffer of `size` items; then each new item takes the place of a
random one, which goes out. When the source ends (a finite stream), the rest goes out in random order.

Both buffers are needed. Records: the shards hold files in repository order, so neighbours are near
copies. Sequences: packing cuts each file into consecutive blocks, so without a second buffer a batch
holds neighbouring pieces of one or two files -- correlated gradients that stall small-batch training
(the tiny preset plateaued at the unigram loss without it).

The buffer's items and its RNG are the state; how items are stored is the owner's business (records as
references to re-read, sequences as uint16 blocks), so `state_dict` takes an `encode` function. With
`journal=True` every slot write is also logged, so a process that did not run the buffer (the data
loader's consumer) can keep an exact copy of it from the writes alone, without receiving it whole.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any


class ShuffleBuffer:
    def __init__(self, size: int, seed: str, journal: bool = False):
        self.size = size
        self.rng = random.Random(seed)
        self.items: list[Any] = []
        self.draining = False  # the source ended: items are leaving in an already shuffled order
        self.journal: list[tuple[int, Any]] | None = [] if journal else None

    def push(self, item: Any) -> Any | None:
        """Add `item`; once the buffer is full, return the random earlier item it replaced (else None)."""
        if self.size <= 1:
            return item
        if len(self.items) < self.size:
            slot, out = len(self.items), None
            self.items.append(item)
        else:
            slot = self.rng.randrange(self.size)
            out, self.items[slot] = self.items[slot], item
        if self.journal is not None:
            self.journal.append((slot, item))
        return out

    def drain(self) -> Iterator[Any]:
        """The remaining items in random order (the source has ended); resumable half-way."""
        if not self.draining:
            self.rng.shuffle(self.items)
            self.draining = True
        while self.items:
            yield self.items.pop()

    def take_journal(self) -> list[tuple[int, Any]]:
        """The slot writes since the last call. Draining is not journaled: only finite data drains, and
        the loader never needs to resume that."""
        out, self.journal = self.journal, []
        return out

    def state_dict(self, encode: Callable[[list], Any] = list) -> dict:
        return {"size": self.size, "items": encode(self.items), "rng": self.rng.getstate(),
                "draining": self.draining}

    def load_state_dict(self, state: dict, decode: Callable[[Any], list] = list) -> None:
        self.items = decode(state["items"])
        self.rng.setstate(state["rng"])
        self.draining = state["draining"]
