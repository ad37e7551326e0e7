"""GPT-2's byte-level BPE tokenizer, written from scratch, with the reference library's exact output.

Encoding a text takes four steps, the same as OpenAI's GPT-2 and Hugging Face `tokenizers`:

1. split off special tokens (`<|endoftext|>`): they are whole tokens and never reach the regex;
2. cut the rest with the GPT-2 regex into pieces ("words"): ` def`, ` say`, `_`, `hello`, `():` ...;
   pieces never cross a piece boundary, so BPE only ever merges inside one piece;
3. write each piece's UTF-8 bytes as printable characters (`bytes_to_unicode`: ' ' -> 'Ġ'),
   so that every string is made of the 256 base symbols and no byte is ever unknown;
4. apply the learned merges inside each piece, lowest rank (earliest learned) first.

Speed comes from step 4 being done once per distinct piece: code repeats the same few thousand
pieces (`Ġself`, `ĊĠĠĠĠĠĠĠ`, ...), so a dict from piece to ids answers almost every lookup, and the
hot loop is a regex `findall` plus C-level dict lookups. The other speed paths live beside this
module: fast/split.py (the split through a pattern of ASCII classes), fast/piece_cuts.py (long
non-ASCII pieces, e.g. Chinese clauses, cut where no merge can cross) and fast/parallel_encode.py
(batches over processes). Here, the pattern of BMP classes for non-ASCII text, and the word cache's
ids kept as chr(id) strings (see _to_ids). The Hugging Face file formats live in tokenizer/files.py.

The Unicode pitfall: GPT-2's pattern says `\\p{L}`, `\\p{N}` and `\\s`, whose meaning depends on the
regex engine's Unicode tables. The reference runs it through Oniguruma with tables of its own;
each `regex` release ships the newest Unicode, in which thousands more code points are letters.
One such character in a file changes the pieces, hence the ids and, in training, every later
merge. So our pattern has no property class at all: its classes are the explicit code-point
ranges of tokenizer/unicode_tables.py, generated from the reference itself, and the standard `re` module
runs it. No installed `regex` release can change the pieces.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import lshift, or_
from pathlib import Path

from minicodeparrot.errors import UserError
from minicodeparrot.tokenizer import files as tokenizer_files
from minicodeparrot.tokenizer.fast import parallel_encode, piece_cuts
from minicodeparrot.tokenizer.fast.split import ASCII_RE, split_any
from minicodeparrot.tokenizer.files import EOS_TOKEN
from minicodeparrot.tokenizer.unicode_tables import LETTERS, NUMBERS, SPACES

__all__ = ["EOS_TOKEN", "GPT2_PATTERN", "SPLIT_PATTERN", "Tokenizer", "bytes_to_unicode", "pre_tokenize",
           "split_pieces"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each of the 256 byte values to a printable character.

    BPE works on strings, and vocab.json/merges.txt are text files, so every byte needs a visible,
    non-whitespace character. The 188 printable Latin-1 bytes stand for themselves; the other 68
    (controls, space, DEL, no-break space, soft hyphen) are sent, in byte order, to chr(256),
    chr(257), ...: this is why a space shows up as 'Ġ' and a newline as 'Ċ' in GPT-2 tokens.

    {..., 10: 'Ċ', ..., 32: 'Ġ', 33: '!', ..., 65: 'A', ...}: 256 entries, keys 0..255 in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return dict(sorted(mapping.items()))


# The GPT-2 pattern, verbatim. Note the contractions are case-sensitive ('LL is "'" + "LL") and
# `\s+(?!\S)` leaves the last space of a run to start the next word: "\n    print" -> "\n   ", " print".
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def char_class(ranges: Sequence[tuple[int, int]], negate: bool = False) -> str:
    """A regex character class of explicit code-point ranges.

    [(0x41, 0x5A), (0xAA, 0xAA)] -> [\\x41-\\x5a\\xaa]; with negate=True, [^\\x41-\\x5a\\xaa].
    """
    def esc(c: int) -> str:
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"

    body = "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)
    return f"[{'^' if negate else ''}{body}]"


# The same pattern with the reference's classes spelled out: L = \p{L}, N = \p{N}, S = \s.
_L, _N, _S = char_class(LETTERS), char_class(NUMBERS), char_class(SPACES)
_OTHER = char_class(sorted(LETTERS + NUMBERS + SPACES), negate=True)  # [^\s\p{L}\p{N}]
_NOT_S = char_class(SPACES, negate=True)  # \S
SPLIT_PATTERN = rf"""'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?{_OTHER}+|{_S}+(?!{_NOT_S})|{_S}+"""
# `re`, not `regex`: with explicit classes both give the same pieces, and `re` is faster here.
_SPLIT_RE = re.compile(SPLIT_PATTERN)


def _bmp(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges cut to the Basic Multilingual Plane (U+0000..U+FFFF):
    [(0x41, 0x5A), (0xFF00, 0x1000F), (0x10400, 0x1044F)] -> [(0x41, 0x5A), (0xFF00, 0xFFFF)]."""
    return [(a, min(b, 0xFFFF)) for a, b in ranges if a <= 0xFFFF]


# The same pattern for text without astral characters (above U+FFFF; emoji are): `re` tests a class of
# BMP code points with one table lookup, but scans a class's astral ranges one by one for every
# character outside the table, so this one splits non-ASCII prose 3-4x faster.
_BMP_L, _BMP_N, _BMP_S = char_class(_bmp(LETTERS)), char_class(_bmp(NUMBERS)), char_class(_bmp(SPACES))
_BMP_OTHER = char_class(sorted(_bmp(LETTERS) + _bmp(NUMBERS) + _bmp(SPACES)), negate=True)
_BMP_RE = re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?{_BMP_L}+| ?{_BMP_N}+| ?{_BMP_OTHER}+|{_BMP_S}+"""
                     rf"""(?!{char_class(_bmp(SPACES), negate=True)})|{_BMP_S}+""")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")

_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _split_re(text: str) -> re.Pattern:
    if text.isascii():
        return ASCII_RE
    return _BMP_RE if _ASTRAL.search(text) is None else _SPLIT_RE


def _to_symbols(piece: str) -> str:
    """A raw piece as byte-level symbols: ' say' -> 'Ġsay', '€' -> 'âĤ¬'."""
    return piece.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR)


def split_pieces(text: str) -> list[str]:
    """The GPT-2 regex pieces of `text`, as raw text.

    "def say_hello():" -> ["def", " say", "_", "hello", "():"].

    SPLIT_PATTERN's pieces, through the fastest pattern that gives them: ASCII classes, BMP classes, or
    fast/split.py's stand-ins for text with astral characters (emoji).
    """
    if text.isascii():
        return ASCII_RE.findall(text)
    return _BMP_RE.findall(text) if _ASTRAL.search(text) is None else split_any(text)


def pre_tokenize(text: str) -> list[tuple[str, tuple[int, int]]]:
    """Byte-level pieces with character offsets, like the reference's `ByteLevel().pre_tokenize_str`:
    "def say" -> [("def", (0, 3)), ("Ġsay", (3, 7))]."""
    return [(_to_symbols(m.group()), m.span()) for m in _split_re(text).finditer(text)]


# BPE works on token ids. A pair (left, right) is the int `left << ID_BITS | right`, and a merge is
# stored as `rank << ID_BITS | merged_id`: one dict lookup gives both, and the smallest value is
# the lowest rank. Ints hash and compare in C, without building tuples or strings per pair.
# GPT-2's 9th merge, (Ġ, s) -> Ġs, is stored as {220 << 20 | 82: 8 << 20 | 264}: ids Ġ = 220, s = 82,
# rank 8, Ġs = 264. `value & _ID_MASK` (the low 20 bits) is the merged id, 264.
ID_BITS = 20  # ids below 2**20 (GPT-2's are below 2**16)
_ID_MASK = (1 << ID_BITS) - 1
_NO_MERGE = 1 << 62  # the value of a pair that is not a merge


def _bpe(ids: list[int], merges: dict[int, int]) -> list[int]:
    """Apply merges to one piece: repeatedly merge the adjacent pair of lowest rank, leftmost first.

    This is the reference's order (a priority queue of (rank, position)), so `a a a` -> `aa a`.
    `pair[i]` is the merge value of (ids[i], ids[i+1]); after a merge only its two neighbours
    change, and `min`/`index` over the list run in C, which keeps a cache miss cheap.

    " say" with GPT-2 (r<<20|id: a merge of rank r into id; -: not a merge):
        ids [220, 82, 64, 88] (Ġ s a y)   pair [8<<20|264, 11144<<20|11400, 67<<20|323]
        ids [264, 64, 88]     (Ġs a y)    pair [217<<20|473, 67<<20|323]
        ids [264, 323]        (Ġs ay)     pair [654<<20|910]
        ids [910]             (Ġsay)      pair []
    """
    get = merges.get
    pair = list(map(get, map(or_, map(lshift, ids, repeat(ID_BITS)), ids[1:]), repeat(_NO_MERGE)))
    while pair:
        best = min(pair)
        if best == _NO_MERGE:
            break
        i = pair.index(best)
        ids[i : i + 2] = (best & _ID_MASK,)
        del pair[i]
        if i > 0:
            pair[i - 1] = get(ids[i - 1] << ID_BITS | ids[i], _NO_MERGE)
        if i < len(pair):
            pair[i] = get(ids[i] << ID_BITS | ids[i + 1], _NO_MERGE)
    return ids


# Distinct pieces kept in a tokenizer's word cache. A call that finds it fuller than this empties it
# first, so a long-lived tokenizer (a worker, a service) stays bounded; results never depend on it.
CACHE_LIMIT = 1 << 18


# The word cache keeps a piece's ids as a string of one character per id, chr(id): " say" -> "\u038e"
# (id 910), "文" -> "\u5d45\u00e5" (ids 23877, 229). A text's ids are then one C-level "".join of cached
# strings, read as ints once at the end (`_to_ids`), and a Chinese clause's ids are one C-level
# `str.translate` of its characters (see Tokenizer._bpe_piece).
_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"  # the byte order of a uint32 here


def _to_ids(ids: str) -> list[int]:
    """The ids in a string of chr(id): "\\u038e\\u00c6" -> [910, 198]."""
    # UTF-32 writes each character as its code point in 4 bytes: read back as uint32, they are the ids.
    return memoryview(ids.encode(_UTF32, "surrogatepass")).cast("I").tolist()


class _WordCache(dict):
    """piece -> ids (as chr(id) characters). A piece not in it is BPE'd on its first lookup
    (`__missing__`), so encoding is one C-level `"".join(map(cache.__getitem__, pieces))` and no
    lookup can ever fail."""

    def __init__(self, bpe: Callable) -> None:
        super().__init__()
        self.bpe = bpe

    def __missing__(self, piece):
        ids = self[piece] = self.bpe(piece)
        return ids


class Tokenizer:
    """A byte-level BPE tokenizer: `vocab` (token -> id), `merges` (in rank order), special tokens."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Sequence[str] = (EOS_TOKEN,),
    ) -> None:
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        for tok in special_tokens:  # like the reference's add_special_tokens: append if missing
            if tok not in self.vocab:
                self.vocab[tok] = max(self.vocab.values(), default=-1) + 1
        self.special_tokens = list(special_tokens)
        self._check()
        v = self.vocab
        self._merges = {v[a] << ID_BITS | v[b]: rank << ID_BITS | v[a + b]
                        for rank, (a, b) in enumerate(self.merges)}
        self._byte_ids = {b: v[c] for b, c in _BYTE_TO_CHAR.items() if c in v}
        self._cross_index: piece_cuts.CrossIndex | None = None  # built on the first long non-ASCII piece
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        special = set(self.special_tokens)
        self._id_to_bytes = {
            i: t.encode("utf-8") if t in special else bytes(_CHAR_TO_BYTE[c] for c in t)
            for t, i in self.vocab.items()
        }
        # Longest first, so that an added token that contains another wins (leftmost-longest).
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._cache = _WordCache(self._bpe_piece)
        # code point -> that character's ids (as chr(id)): a `str.translate` table for _fill.
        self._char_ids = _WordCache(lambda cp: self._cache[chr(cp)])

    def _check(self) -> None:
        ids = list(self.vocab.values())
        if len(set(ids)) != len(ids):
            raise UserError("vocab maps two tokens to the same id; the vocab file is corrupt, regenerate it")
        if max(ids, default=0) >> ID_BITS or min(ids, default=0) < 0:
            raise UserError(f"token ids must be in 0..{_ID_MASK}; this vocab is not a GPT-2 style vocab")
        special = set(self.special_tokens)
        for t in self.vocab:
            if t not in special and any(c not in _CHAR_TO_BYTE for c in t):
                raise UserError(f"vocab token {t!r} is not byte-level (GPT-2 style); use a byte-level vocab")
        for a, b in self.merges:
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise UserError(f"merge {a!r} {b!r} uses a token missing from the vocab; files do not match")

    # --- files (tokenizer/files.py) --------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer directory (tokenizer.json, or vocab.json + merges.txt), a tokenizer.json
        file, or a Hub model repo (`codeparrot/codeparrot`, `gpt2`), downloaded into the Hub cache."""
        return cls(*tokenizer_files.load(name))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json (Hugging Face layouts)."""
        return tokenizer_files.write(directory, self.vocab, self.merges, self.special_tokens)

    # --- encoding -------------------------------------------------------------------------------
    def _bpe_piece(self, piece: str) -> str:
        """The ids of one piece (as chr(id) characters): BPE, or the BPE of its parts (piece_cuts).

        A Chinese clause is a new piece nearly every time. When no token crosses between any two of
        its characters, its ids are its characters' ids in order, which `str.translate` writes in C
        from the per-character table: "中文" -> "\\u9f58" + "\\u5d45\\u00e5" (中 is one token, 40792;
        文 two, 23877 229).
        """
        if not piece.isascii() and piece_cuts.TWO_NON_ASCII.search(piece):
            if self._cross_index is None:  # built on the first non-ASCII piece
                self._cross_index = piece_cuts.CrossIndex(self._id_to_bytes.values())
            if self._cross_index.free(piece):
                return piece.translate(self._char_ids)
            segments = self._cross_index.segments(piece)
            if len(segments) > 1:  # each part is looked up (and, if new, BPE'd) on its own
                return "".join(map(self._cache.__getitem__, segments))
        ids = _bpe(list(map(self._byte_ids.__getitem__, piece.encode("utf-8"))), self._merges)
        return "".join(map(chr, ids))

    def _parts(self, text: str, parse_special: bool) -> list[tuple[int, str, bool]]:
        """(start, substring, is_special) for the stretches between special tokens, and for them:
        "a<|endoftext|>b" -> [(0, "a", False), (1, "<|endoftext|>", True), (14, "b", False)].

        Called once per encode: the place to keep the word cache bounded (see CACHE_LIMIT)."""
        if len(self._cache) > CACHE_LIMIT:
            self._cache.clear()
            self._char_ids.clear()
        if not parse_special or self._special_re is None:
            return [(0, text, False)]
        parts, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                parts.append((pos, text[pos : m.start()], False))
            parts.append((m.start(), m.group(), True))
            pos = m.end()
        if pos < len(text):
            parts.append((pos, text[pos:], False))
        return parts

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`.

        With parse_special=True (the reference's behaviour) a literal `<|endoftext|>` becomes its
        special id. Data packing passes False: a source file that contains the string must not be
        able to forge a document boundary, so it is encoded as the plain text `<|`, `endoftext`, `|>`.
        """
        ids = [chr(self.vocab[part]) if special else "".join(map(self._cache.__getitem__, split_pieces(part)))
               for _, part, special in self._parts(text, parse_special)]
        return _to_ids("".join(ids))

    def encode_with_offsets(self, text: str, parse_special: bool = True
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character offsets in `text`, as the reference's
        `Encoding.ids` / `Encoding.offsets` for the tokenizer.json we write.

        A token holding only some of a character's UTF-8 bytes (an emoji is often three tokens)
        gets that whole character's span, and a token with bytes of several characters spans all
        of them: offsets are in characters, and a character is never cut.
        """
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, part, special in self._parts(text, parse_special):
            if special:
                ids.append(self.vocab[part])
                offsets.append((start, start + len(part)))
                continue
            matches = list(_split_re(part).finditer(part))
            for m in matches:
                piece_ids = _to_ids(self._cache[m.group()])
                ids.extend(piece_ids)
                # char_of[k]: the character (offset in `text`) that holds byte k of the piece.
                char_of = [start + m.start() + j for j, ch in enumerate(m.group())
                           for _ in range(len(ch.encode("utf-8")))]
                k = 0
                for i in piece_ids:
                    n = len(self._id_to_bytes[i])
                    offsets.append((char_of[k], char_of[k + n - 1] + 1))
                    k += n
        return ids, offsets

    def encode_batch(
        self, texts: Sequence[str], num_workers: int | None = None, parse_special: bool = True
    ) -> list[list[int]]:
        """Encode many texts; large batches are split over worker processes, in order."""
        return parallel_encode.encode_batch(self.encode, texts, num_workers, parse_special)

    def __getstate__(self) -> dict:
        # The cache can be large and is cheap to rebuild: do not send it to worker processes.
        return {"vocab": self.vocab, "merges": self.merges, "special_tokens": self.special_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab"], state["merges"], state["special_tokens"])

    # --- decoding and inspection ------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept. Bytes that are not valid UTF-8 become U+FFFD."""
        try:
            data = b"".join(map(self._id_to_bytes.__getitem__, ids))
        except KeyError as e:
            raise UserError(f"token id {e.args[0]} is not in this tokenizer's vocab of {len(self)}") from None
        return data.decode("utf-8", errors="replace")

    def tokenize(self, text: str, parse_special: bool = True) -> list[str]:
        """Token strings as in the book: ['def', 'Ġsay', '_', 'hello', ...]."""
        return self.convert_ids_to_tokens(self.encode(text, parse_special=parse_special))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._id_to_token[i] for i in ids]

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def eos_token(self) -> str | None:
        if EOS_TOKEN in self.special_tokens:
            return EOS_TOKEN
        return self.special_tokens[0] if self.special_tokens else None

    @property
    def eos_token_id(self) -> int | None:
        eos = self.eos_token
        return None if eos is None else self.vocab[eos]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={len(self)}, merges={len(self.merges)}, specials={self.special_tokens})"
