"""Speed paths for the GPT-2 split: a pattern of tiny ASCII classes, for ASCII text and for any text.

Most source files are pure ASCII. For them the GPT-2 pattern reduces to classes of a few ASCII
characters, which the standard `re` engine tests with one bitmap lookup instead of searching
tokenizer/bpe.py's tables of ~800 Unicode ranges: about twice as fast, and the pieces are the same
(tests/tokenizer/test_bpe.py compares the two patterns on every ASCII character in every context).

Spelled out rather than `\\s`: `re`'s `\\s` also matches U+001C..U+001F, which the reference does
not call whitespace (see minicodeparrot/tokenizer/unicode_tables.py).
"""

from __future__ import annotations

import re
from itertools import accumulate, chain

import numpy as np

from minicodeparrot.tokenizer.unicode_tables import LETTERS, NUMBERS, SPACES

_WS = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = (
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
)
ASCII_RE = re.compile(ASCII_PATTERN)


# Speed for text with astral characters (emoji; other non-ASCII text goes through tokenizer/bpe.py's
# pattern of BMP classes, which `re` tests with one table lookup, but astral ranges one by one): map
# every character to an ASCII stand-in of the same class -- a letter to "a", a number to "0", a
# space to "\t", anything else to "!", ASCII to itself -- run the ASCII pattern on that, and cut
# the real text at the same places. The stand-ins are safe: "a" is in no contraction ('s, 't, 're,
# 've, 'm, 'll, 'd), "\t" is a space but not the " " that ` ?` takes, "!" is not "'". The mapping is
# one numpy lookup per character, and the ASCII pattern runs at bitmap speed.
_STAND_IN = np.full(0x110000, ord("!"), dtype=np.uint8)
for _table, _char in ((LETTERS, "a"), (NUMBERS, "0"), (SPACES, "\t")):
    for _a, _b in _table:
        _STAND_IN[_a : _b + 1] = ord(_char)
_STAND_IN[:128] = np.arange(128, dtype=np.uint8)


def split_any(text: str) -> list[str]:
    """The GPT-2 pieces of any text (same as tokenizer.SPLIT_PATTERN's), through the ASCII pattern.

    "¿Qué 3€?" -> stand-ins "!Qua 3!?" -> ASCII pieces "!", "Qua", " 3", "!?" -> the same spans of the
    text: ["¿", "Qué", " 3", "€?"].
    """
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lengths = map(len, ASCII_RE.findall(_STAND_IN[codes].tobytes().decode("ascii")))
    ends = list(accumulate(lengths))
    return list(map(text.__getitem__, map(slice, chain((0,), ends), ends)))
