"""A speed path for BPE on long non-ASCII pieces: cut them where no merge can ever cross.

A Chinese clause is one GPT-2 piece (` ?\\p{L}+` swallows it whole), 30-90 bytes that are nearly
always new, so the word cache misses and BPE runs on every byte. But BPE only ever joins bytes
into tokens of the vocab: if no vocab token occurs in the piece's bytes across a position, no
merge can cross it, the two sides are merged independently, and
BPE(piece) = BPE(left) + BPE(right) exactly. Cut there, and each side is a short string that the
word cache already knows (a common character, a frequent Cyrillic syllable).

We only look between two non-ASCII characters, and only at bigrams of two non-ASCII bytes: few
tokens hold those, so the check is a dict lookup and a handful of byte comparisons. Between ASCII
letters nearly every position is crossed by some token; there is nothing to gain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import accumulate

_MAX_CANDIDATES = 64  # a bigram inside more tokens than this: do not cut there (always exact, just slower)
# Between two non-ASCII characters; an ASCII character.
_BETWEEN = re.compile(r"(?<=[^\x00-\x7f])(?=[^\x00-\x7f])")
_ASCII = re.compile(r"[\x00-\x7f]")


class CrossIndex:
    """The vocab's tokens, indexed by the bigrams of two non-ASCII bytes they hold."""

    def __init__(self, tokens: Iterable[bytes]) -> None:
        self.where: dict[bytes, list[tuple[bytes, int]]] = {}  # bigram -> [(token, offset of the bigram)]
        for t in tokens:
            if t.isascii():
                continue
            for k in range(len(t) - 1):
                if t[k] >= 0x80 and t[k + 1] >= 0x80:
                    self.where.setdefault(t[k : k + 2], []).append((t, k))
        # The bigrams that a token holds across a character boundary (continuation byte, lead byte):
        # a piece holding none of them can be cut between every two non-ASCII characters at once.
        # One branch per first byte, `\x80[\xe4\xe5]`: the regex engine skips on the first byte.
        seconds: dict[int, bytes] = {}
        for b in self.where:
            if b[0] < 0xC0 <= b[1]:
                seconds[b[0]] = seconds.get(b[0], b"") + re.escape(b[1:])
        across = [re.escape(bytes([first])) + b"[" + rest + b"]" for first, rest in seconds.items()]
        self.across = re.compile(b"|".join(across) if across else rb"(?!)")

    def segments(self, piece: str) -> list[str]:
        """`piece` cut at every position between two non-ASCII characters that no token crosses."""
        no_ascii = _ASCII.search(piece) is None  # e.g. a Chinese clause: cut between any two characters
        if not no_ascii and _BETWEEN.search(piece) is None:  # e.g. a Spanish word with one accent
            return [piece]
        data = piece.encode("utf-8")
        blocked = set()
        for m in self.across.finditer(data):  # the only positions where a token might cross
            p = m.start() + 1
            candidates = self.where[m.group()]
            # A token t holding the bigram at offset k would sit at data[p - 1 - k : ...].
            if len(candidates) > _MAX_CANDIDATES or any(
                    k < p and data[p - 1 - k : p - 1 - k + len(t)] == t for t, k in candidates):
                blocked.add(p)
        parts = list(piece) if no_ascii else _BETWEEN.split(piece)
        if blocked:  # glue the parts back together where a token crosses, rightmost first
            ends = list(accumulate(map(len, parts)))
            for j in sorted((len(data[:p].decode("utf-8")) for p in blocked), reverse=True):
                i = ends.index(j)  # parts[i] ends at character j
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts
