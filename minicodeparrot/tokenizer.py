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
hot loop is a `regex.findall` plus C-level dict lookups.

The Unicode-version pitfall: the reference compiles the pattern with Oniguruma, whose tables are
Unicode 16.0; `regex` has newer tables. Letters and numbers assigned after 16.0 would be `\\p{L}`
or `\\p{N}` for us and punctuation for the reference, which changes pieces and therefore ids (and,
for training, the merges). We subtract those code points from both classes (`_NEW_IN_UNICODE_17`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import regex

from minicodeparrot.errors import UserError

EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each of the 256 byte values to a printable character.

    BPE works on strings, and vocab.json/merges.txt are text files, so every byte needs a visible,
    non-whitespace character. The 188 printable Latin-1 bytes stand for themselves; the other 68
    (controls, space, DEL, no-break space, soft hyphen) are sent, in byte order, to chr(256),
    chr(257), ...: this is why a space shows up as 'Ġ' and a newline as 'Ċ' in GPT-2 tokens.
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


# Code points that `regex` (Unicode 17.0 tables) puts in \p{L} or \p{N} and the reference (Oniguruma,
# Unicode 16.0) does not: the letters and numbers newly assigned in Unicode 17.0. Derived by experiment
# over every code point by scripts/make_unicode_tables.py (which also checks that the converse set is
# empty and that \s agrees everywhere): 4,657 code points in 26 ranges with regex 2026.5.9. Without
# this, a file containing e.g. U+A7CE splits differently. A `regex` with older tables loses nothing by
# the subtraction; one with newer tables is caught by tests/test_tokenizer.py's code-point sweep.
_NEW_IN_UNICODE_17 = (
    (0x088F, 0x088F), (0x0C5C, 0x0C5C), (0x0CDC, 0x0CDC), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2),
    (0xA7D4, 0xA7D4), (0xA7F1, 0xA7F1), (0x10940, 0x10959), (0x10EC5, 0x10EC7), (0x11DB0, 0x11DDB),
    (0x11DE0, 0x11DE9), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6), (0x187F8, 0x187FF),
    (0x18D09, 0x18D1E), (0x18D80, 0x18DF2), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5),
    (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF), (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD),
    (0x323B0, 0x33479),
)

# The GPT-2 pattern, verbatim. Note the contractions are case-sensitive ('LL is "'" + "LL") and
# `\s+(?!\S)` leaves the last space of a run to start the next word: "\n    print" -> "\n   ", " print".
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_NEW = "".join(rf"\U{a:08x}-\U{b:08x}" for a, b in _NEW_IN_UNICODE_17)
_L, _N = rf"[\p{{L}}--[{_NEW}]]", rf"[\p{{N}}--[{_NEW}]]"
_OTHER = rf"[[^\s\p{{L}}\p{{N}}][{_NEW}]]"
PINNED_PATTERN = rf"""'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?{_OTHER}+|\s+(?!\S)|\s+"""

# Set operations in character classes need regex's V1 syntax.
_PINNED_RE = regex.compile(PINNED_PATTERN, regex.V1)

# Speed: most source files are pure ASCII, and for ASCII text the pattern reduces to explicit classes
# that the standard `re` engine runs about twice as fast as `regex` runs the Unicode pattern. Spelled
# out because `re`'s own \s also matches U+001C..U+001F, which neither GPT-2 engine calls whitespace.
_WS = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = (
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
)
_ASCII_RE = re.compile(ASCII_PATTERN)

_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_LATIN1_TO_CHAR = {b: c for b, c in _BYTE_TO_CHAR.items()}  # str.translate table: chr(b) -> symbol


def _to_symbols(piece: str) -> str:
    """A raw piece as byte-level symbols: ' say' -> 'Ġsay', '€' -> 'âĤ¬'."""
    return piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_CHAR)


def split_pieces(text: str) -> list[str]:
    """The GPT-2 regex pieces of `text`, as raw text (classes pinned to Unicode 16.0)."""
    return (_ASCII_RE if text.isascii() else _PINNED_RE).findall(text)


def pre_tokenize(text: str) -> list[tuple[str, tuple[int, int]]]:
    """Byte-level pieces with character offsets, like the reference's `ByteLevel().pre_tokenize_str`."""
    pattern = _ASCII_RE if text.isascii() else _PINNED_RE
    return [(_to_symbols(m.group()), m.span()) for m in pattern.finditer(text)]


_NO_MERGE = 1 << 62  # rank of a pair that is not a merge


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges to one piece: repeatedly merge the adjacent pair of lowest rank, leftmost first.

    This is the reference's order (a priority queue of (rank, position)), so `a a a` -> `aa a`.
    `pair_ranks[i]` is the rank of (symbols[i], symbols[i+1]); after a merge only its two neighbours
    change, and `min`/`index` over the list run in C, which keeps a cache miss cheap.
    """
    get = ranks.get
    pair_ranks = [get(pair, _NO_MERGE) for pair in zip(symbols, symbols[1:], strict=False)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        i = pair_ranks.index(best)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get((symbols[i - 1], symbols[i]), _NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = get((symbols[i], symbols[i + 1]), _NO_MERGE)
    return symbols


# encode_batch: texts below this many characters in total are encoded in-process, because starting
# worker processes (and sending them the vocab) costs more than it saves.
_PARALLEL_MIN_CHARS = 1 << 20
_CACHE_MAX = 1 << 18  # distinct pieces kept; the cache is simply cleared when full
_worker: Tokenizer | None = None


def _worker_init(tok: Tokenizer) -> None:
    global _worker
    _worker = tok


def _worker_encode(args: tuple[list[str], bool]) -> list[list[int]]:
    texts, parse_special = args
    return [_worker.encode(t, parse_special=parse_special) for t in texts]


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
        self._ranks = {pair: i for i, pair in enumerate(self.merges)}
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        special = set(self.special_tokens)
        self._id_to_bytes = {
            i: t.encode("utf-8") if t in special else bytes(_CHAR_TO_BYTE[c] for c in t)
            for t, i in self.vocab.items()
        }
        # Longest first, so that an added token that contains another wins (leftmost-longest).
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = None
        if alternatives:
            self._special_re = regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")
        self._cache: dict[str, tuple[int, ...]] = {}

    def _check(self) -> None:
        ids = list(self.vocab.values())
        if len(set(ids)) != len(ids):
            raise UserError("vocab maps two tokens to the same id; the vocab file is corrupt, regenerate it")
        special = set(self.special_tokens)
        for t in self.vocab:
            if t not in special and any(c not in _CHAR_TO_BYTE for c in t):
                raise UserError(f"vocab token {t!r} is not byte-level (GPT-2 style); use a byte-level vocab")
        for a, b in self.merges:
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise UserError(f"merge {a!r} {b!r} uses a token missing from the vocab; files do not match")

    # --- loading and saving ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory holding tokenizer.json, or vocab.json + merges.txt (or a tokenizer.json path)."""
        path = Path(path)
        if path.is_file() and path.suffix == ".json":
            return cls._from_tokenizer_json(path)
        if not path.is_dir():
            raise UserError(f"tokenizer directory {str(path)!r} does not exist; pass a tokenizer directory")
        if (path / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls._from_vocab_merges(path / "vocab.json", path / "merges.txt")
        raise UserError(
            f"{str(path)!r} has no tokenizer.json nor vocab.json + merges.txt; pass a tokenizer directory"
        )

    @classmethod
    def _from_tokenizer_json(cls, file: Path) -> Tokenizer:
        data = _read_json(file)
        try:
            model = data["model"]
            if model.get("type", "BPE") != "BPE":
                raise UserError(f"{file} holds a {model.get('type')} model; only BPE is supported")
            pre = data.get("pre_tokenizer") or {}
            if pre.get("type") != "ByteLevel":
                raise UserError(f"{file} has no ByteLevel pre-tokenizer; only GPT-2 style BPE is supported")
            vocab = model["vocab"]
            # Two formats: old files write merges as "a b" strings, newer ones as ["a", "b"] pairs.
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added = data.get("added_tokens") or []
            for t in added:
                vocab.setdefault(t["content"], t["id"])
            specials = [t["content"] for t in added]
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{file} is not a valid tokenizer.json ({e!r}); regenerate it") from None
        if any(len(m) != 2 for m in merges):
            raise UserError(f"{file} has a malformed merge (not two tokens); regenerate it")
        return cls(vocab, merges, specials)

    @classmethod
    def _from_vocab_merges(cls, vocab_file: Path, merges_file: Path) -> Tokenizer:
        vocab = _read_json(vocab_file)
        if not isinstance(vocab, dict):
            raise UserError(f"{vocab_file} is not a JSON object of token -> id; regenerate it")
        try:
            lines = merges_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{merges_file} is not UTF-8 text; regenerate it") from None
        merges = []
        for n, line in enumerate(lines, 1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise UserError(f"{merges_file}:{n}: expected two tokens separated by a space, got {line!r}")
            merges.append((parts[0], parts[1]))
        specials = [EOS_TOKEN] if EOS_TOKEN in vocab else []
        return cls(vocab, merges, specials)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json (Hugging Face layouts)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # Special tokens stay in the model vocab too, as in GPT-2's files and the reference trainer's:
        # vocab.json + merges.txt alone then still know <|endoftext|>.
        model_vocab = dict(sorted(self.vocab.items(), key=lambda kv: kv[1]))
        (out / "vocab.json").write_text(json.dumps(model_vocab, ensure_ascii=False), encoding="utf-8")
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        tokenizer_json = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": self.vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for t in self.special_tokens
            ],
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": {**byte_level, "trim_offsets": False},
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": model_vocab, "merges": [list(m) for m in self.merges],
            },
        }
        (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        eos = self.eos_token
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": 1024,
            "add_prefix_space": False,
            "bos_token": eos, "eos_token": eos, "unk_token": eos,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out

    # --- encoding -------------------------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = (_ASCII_RE if text.isascii() else _PINNED_RE).findall(text)
        cache = self._cache
        missing = set(pieces).difference(cache)
        if missing:
            if len(cache) + len(missing) > _CACHE_MAX:
                cache.clear()
            vocab, ranks = self.vocab, self._ranks
            for piece in missing:
                cache[piece] = tuple(map(vocab.__getitem__, _bpe(list(_to_symbols(piece)), ranks)))
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Token ids of `text`.

        With parse_special=True (the reference's behaviour) a literal `<|endoftext|>` becomes its
        special id. Data packing passes False: a source file that contains the string must not be
        able to forge a document boundary, so it is encoded as the plain text `<|`, `endoftext`, `|>`.
        """
        if not parse_special or self._special_re is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self.vocab[part])
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def encode_batch(
        self, texts: Sequence[str], num_workers: int | None = None, parse_special: bool = True
    ) -> list[list[int]]:
        """Encode many texts; large batches are split over worker processes, in order."""
        texts = list(texts)
        if num_workers is None:
            num_workers = min(_cpu_count(), 8)
        total = sum(map(len, texts))
        # Daemonic processes (e.g. DataLoader workers) may not have children: encode in-process there.
        in_daemon = multiprocessing.current_process().daemon
        if num_workers <= 1 or len(texts) < 2 or total < _PARALLEL_MIN_CHARS or in_daemon:
            return [self.encode(t, parse_special=parse_special) for t in texts]
        # Contiguous chunks of about equal character count, a few per worker to even out the load.
        n_chunks = num_workers * 4
        target = total / n_chunks
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
        ctx = multiprocessing.get_context()
        with ctx.Pool(num_workers, initializer=_worker_init, initargs=(self,)) as pool:
            return [ids for chunk in pool.imap(_worker_encode, chunks) for ids in chunk]

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
        return [self._id_to_token[i] for i in self.encode(text, parse_special=parse_special)]

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

    # --- training -------------------------------------------------------------------------------
    def train_new_from_iterator(
        self,
        iterator: Iterable[str | list[str]],
        vocab_size: int,
        initial_alphabet: Iterable[str] | None = None,
        min_frequency: int = 0,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a new tokenizer of the same kind (byte-level BPE, same special tokens), like the book.

        As in `transformers`, the full 256-symbol byte alphabet is always part of the new vocab, so
        the result can encode any text; `initial_alphabet` may add more symbols.
        """
        from minicodeparrot.bpe_trainer import train_bpe

        alphabet = sorted(set(_BYTE_TO_CHAR.values()) | set(initial_alphabet or ()))
        return train_bpe(
            iterator, vocab_size, special_tokens=tuple(self.special_tokens), min_frequency=min_frequency,
            initial_alphabet=alphabet, show_progress=show_progress,
        )


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file} does not exist; pass a tokenizer directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); the file is corrupt, regenerate it") from None
