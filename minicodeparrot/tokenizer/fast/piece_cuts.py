"""A speed path for BPE on long non-ASCII pieces: cut them where no merge can ever cross.

A Chinese clause is one GPT-2 piece (` ?\\p{L}+` swallows it whole), 30-90 bytes that are nearly
always new, so the word cache misses and BPE runs on every byte. But BPE only ever joins bytes
into tokens of the vocab: if no vocab token occurs in the piece's bytes across a position, no
merge can cross it, the two sides are merged independently, and
BPE(piece) = BPE(left) + BPE(right) exactly. Cut there, and each side is a short string that the
word cache already knows (a common character, a frequent Cyrillic syllable).

We only look between two non-ASCII characters. In UTF-8 that position is a continuation byte
(0x80-0xBF, the end of the left character) followed by a lead byte (0xC0-0xFF, the start of the
right one), and few tokens hold such a pair: GPT-2 has 105 ("の魔", "ック", b'\\xb6\\xe6', ...). One
regex of those tokens finds every crossed position. Between ASCII letters nearly every position is
crossed by some token; there is nothing to gain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import accumulate

# Between two non-ASCII characters; an ASCII character; in UTF-8 bytes, the end of one non-ASCII
# character and the start of the next.
_BETWEEN = re.compile(r"(?<=[^\x00-\x7f])(?=[^\x00-\x7f])")
_ASCII = re.compile(r"[\x00-\x7f]")
_CHAR_BOUNDARY = re.compile(rb"[\x80-\xbf](?=[\xc0-\xff])")
# Two non-ASCII characters in a row: a piece without them has no position this module can cut.
TWO_NON_ASCII = re.compile(r"[^\x00-\x7f]{2}")


def trie_pattern(words: list[bytes]) -> bytes:
    """A regex matching any of `words`, the longest at a given start, written as a trie: each byte is
    tested once per position, not once per word (4x faster than `a|b|...` on GPT-2's 105 words).

    [b"ab", b"abc", b"b"] -> b"(?:ab(?:c)?|b)"
    """
    follow: dict[int, list[bytes]] = {}
    for w in words:
        if w:
            follow.setdefault(w[0], []).append(w[1:])
    branches = [re.escape(bytes([b])) + trie_pattern(rest) for b, rest in sorted(follow.items())]
    if not branches:
        return b""
    body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
    # A word that ends here: the rest is optional, and greedy, so the longest word wins.
    return b"(?:" + body + b")?" if b"" in words else body


class CrossIndex:
    """The vocab's tokens that hold bytes of two non-ASCII characters, and where they cross."""

    def __init__(self, tokens: Iterable[bytes]) -> None:
        # token -> the offsets inside it between two characters: b'\xe3\x81\xae\xe9\xad\x94' ("の魔") -> [3]
        self.inner = {t: [m.end() for m in _CHAR_BOUNDARY.finditer(t)]
                      for t in tokens if not t.isascii() and _CHAR_BOUNDARY.search(t)}
        # Of the tokens that start at the same byte the regex finds the longest, and a shorter one
        # crosses only positions that the longer one crosses too.
        self.crossing = re.compile(trie_pattern(list(self.inner)) if self.inner else rb"(?!)")

    def blocked(self, data: bytes) -> set[int]:
        """Byte offsets in `data` (UTF-8) between two non-ASCII characters that some token crosses.

        With GPT-2: "の魔法" -> {3} (the token "の魔" crosses between の and 魔); "中文字" -> set().
        """
        blocked = set()
        m = self.crossing.search(data)
        while m:  # every byte where a crossing token starts (they may overlap: search again from the next)
            blocked.update(m.start() + q for q in self.inner[m.group()])
            m = self.crossing.search(data, m.start() + 1)
        return blocked

    def free(self, piece: str) -> bool:
        """Whether `piece` is all non-ASCII and no token crosses between two of its characters (most
        Chinese clauses): then BPE(piece) is BPE(first character) + BPE(second character) + ... exactly.

        With GPT-2: "中文字" -> True; "の魔法" -> False ("の魔" is a token); " мир" -> False (ASCII space).
        """
        return _ASCII.search(piece) is None and self.crossing.search(piece.encode("utf-8")) is None

    def segments(self, piece: str) -> list[str]:
        """`piece` cut at every position between two non-ASCII characters that no token crosses.

        With GPT-2: " мир" -> [" м", "и", "р"]; "の魔法" -> ["の魔", "法"]; "café" -> ["café"].
        """
        no_ascii = _ASCII.search(piece) is None  # e.g. a Chinese clause: cut between any two characters
        if not no_ascii and _BETWEEN.search(piece) is None:  # e.g. a Spanish word with one accent
            return [piece]
        data = piece.encode("utf-8")
        blocked = self.blocked(data)
        parts = list(piece) if no_ascii else _BETWEEN.split(piece)
        if blocked:  # glue the parts back together where a token crosses, rightmost first
            ends = list(accumulate(map(len, parts)))
            for j in sorted((len(data[:p].decode("utf-8")) for p in blocked), reverse=True):
                i = ends.index(j)  # parts[i] ends at character j
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts
