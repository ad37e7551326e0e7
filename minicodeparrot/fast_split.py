"""A speed path for the GPT-2 split: pure-ASCII text, cut by a pattern of tiny classes.

Most source files are pure ASCII. For them the GPT-2 pattern reduces to classes of a few ASCII
characters, which the standard `re` engine tests with one bitmap lookup instead of searching
tokenizer.py's tables of ~800 Unicode ranges: about twice as fast, and the pieces are the same
(tests/test_tokenizer.py compares the two patterns on every ASCII character in every context).

Spelled out rather than `\\s`: `re`'s `\\s` also matches U+001C..U+001F, which the reference does
not call whitespace (see minicodeparrot/unicode_tables.py).
"""

from __future__ import annotations

import re

_WS = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = (
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
)
ASCII_RE = re.compile(ASCII_PATTERN)
