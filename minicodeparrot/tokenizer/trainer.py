"""Byte-level BPE training, written by hand, that reproduces the reference trainer exactly.

CodeParrot's tokenizer is GPT-2's tokenizer retrained on Python code:
`tokenizer.train_new_from_iterator(texts, vocab_size=32768, initial_alphabet=ByteLevel.alphabet())`.
`train_bpe` gives the same vocabulary (token -> id) and the same merges in the same order as that
call (Hugging Face `tokenizers`, BpeTrainer). Exact parity needs every rule below; each one was
found to matter on real corpora.

Words. Each text (each string of a yielded batch) is split with the GPT-2 regex on its own, so no
piece crosses two texts. Each piece is mapped byte by byte through `bytes_to_unicode` (" def" ->
"Ġdef") and counted. Training only sees the multiset word -> count, which is why we deduplicate
first (a 30 MB corpus has ~100k distinct words) and why counting can run in parallel processes
whose Counters are summed. A literal "<|endoftext|>" in a text is ordinary text here: the
reference drops the base tokenizer's special tokens before it trains.

Ids. Special tokens first, in the given order (<|endoftext|> = 0). Then the alphabet -- every
character seen in the words plus the initial alphabet -- sorted by code point; for byte-level
text that is GPT-2's 256 byte symbols, ids 1..256. Then one id per merge, in merge order.
`vocab_size` counts the specials and the alphabet.

Choosing a merge. A pair's count is summed over words, weighted by word count, over
*overlapping* windows: "aaa" counts (a, a) twice. The best pair has the highest count; ties go
to the smallest (left_id, right_id) -- ids, not strings and not order of appearance, so a pair
starting with a token created early ("zz") beats one created later ("aa"). Training stops when
the vocab is full, when no pair is left, or when the best count is below `min_frequency` (a
pair merges when count >= min_frequency; `train_new_from_iterator` uses 0). The vocab can
therefore end smaller than asked.

Applying a merge. Inside a word, left to right and non-overlapping: "a a a" -> "aa a". Only the
neighbours of each merged occurrence change: the broken pairs lose the word's count, the new
pairs gain it. Like the reference, the merged pair's own count is not decremented (no word holds
it afterwards, so it is never chosen again). Pair counts, the pair -> words index and a heap are
kept incrementally: a merge touches only the words that contain the pair.

The heap. A pair's count only grows in the one merge step that creates one of its tokens;
afterwards it only shrinks. So one heap entry per pair suffices, and an entry whose count is
stale (too high) is pushed back with its current count when it reaches the top ("lazy
invalidation"). The first entry that is popped with a current count is then the true best pair.
An entry is one int, `key - count * V**2` with `key = left * V + right`: heapq compares ints
in C, and the smallest int is the highest count, then the smallest (left, right).

Unicode classes (a pitfall, handled): which code points are letters and numbers depends on the
Unicode tables of the regex engine. We split with `tokenizer.split_pieces`, whose pattern spells
out the reference's own classes as code-point ranges (tokenizer/unicode_tables.py, generated from the
reference library) instead of `\\p{L}`/`\\p{N}`: no `regex` release, old or new, can move a
character (U+A7CE, U+10940, ...) from one class to another and shift every later merge.

Two deliberate differences, both outside what real training hits:
- Counts: the reference stores pair counts as 32-bit signed ints, so a pair seen more than
  2**31 times (" " + " " on many GB of code) wraps around and is dropped. Python ints do
  not wrap; here such a pair is merged, as it should be.
- A vocab_size below specials + alphabet is a UserError; the reference quietly returns just those.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from minicodeparrot.errors import UserError
from minicodeparrot.sources import shards
from minicodeparrot.tokenizer.bpe import Tokenizer, bytes_to_unicode, split_pieces

# GPT-2's 256 byte symbols, sorted by code point ('!' .. 'Ń'): the book's `initial_alphabet`.
BYTE_LEVEL_ALPHABET: list[str] = sorted(bytes_to_unicode().values())

# A text batch sent to one counting process; big enough that pickling and summing the returned
# Counters is small next to the regex work, small enough that both cores stay busy to the end.
CHUNK_CHARS = 1 << 21


# --- counting words --------------------------------------------------------------------------
def _iter_strings(texts: Iterable[str | list[str]]) -> Iterator[str]:
    """The strings of `texts`, batches flattened: ["a", ["b", "c"]] -> "a", "b", "c"."""
    for item in texts:
        if isinstance(item, str):
            yield item
        elif isinstance(item, (list, tuple)):
            for s in item:
                if not isinstance(s, str):
                    raise UserError(f"texts must yield strings or lists of strings, got a list holding "
                                    f"{type(s).__name__}; convert records to their text field first")
                yield s
        else:
            raise UserError(f"texts must yield strings or lists of strings, got {type(item).__name__}; "
                            f"pass the text field of each record")


def _chunks(strings: Iterator[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive strings, grouped until a group holds `chunk_chars` characters:
    "ab", "c", "de", "f" with chunk_chars=3 -> ["ab", "c"], ["de", "f"]."""
    chunk, size = [], 0
    for s in strings:
        chunk.append(s)
        size += len(s)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _count_chunk(chunk: list[str]) -> tuple[Counter, int]:
    """Raw (unmapped) regex pieces of the texts, and their length in characters:
    ["def f", "x"] -> (Counter({"def": 1, " f": 1, "x": 1}), 6). The byte-level mapping comes later, once
    per distinct piece."""
    counts: Counter = Counter()
    for text in chunk:
        counts.update(split_pieces(text))
    return counts, sum(map(len, chunk))


def count_words(texts: Iterable[str | list[str]], num_workers: int | None = None,
                show_progress: bool = True) -> Counter:
    """word (byte-level string such as 'Ġdef') -> number of occurrences in all texts.

    ["def f(x)"] -> Counter({"def": 1, "Ġf": 1, "(": 1, "x": 1, ")": 1}).

    The regex pass is most of the training time, so chunks of texts go to `num_workers` processes
    (default: all cores) and their Counters are summed; an input of one chunk stays in-process.
    """
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    chunks = _chunks(_iter_strings(texts), CHUNK_CHARS)
    head = list(itertools.islice(chunks, 2))
    pool = None
    if num_workers > 1 and len(head) == 2:
        pool = multiprocessing.get_context().Pool(num_workers)
        results = pool.imap_unordered(_count_chunk, itertools.chain(head, chunks))
    else:
        results = map(_count_chunk, itertools.chain(head, chunks))
    pieces: Counter = Counter()
    try:
        with tqdm(desc="counting words", unit="MB", disable=not show_progress) as bar:
            for chunk_counts, n_chars in results:
                pieces.update(chunk_counts)
                bar.update(round(n_chars / 1e6, 2))
    finally:
        if pool is not None:
            pool.terminate()  # all results are in (or we are failing): nothing left to wait for
    # Distinct raw pieces map to distinct byte-level words (UTF-8 and the byte map are injective).
    table = bytes_to_unicode()  # str.translate table: chr(byte) -> symbol, applied to the latin-1 view
    return Counter({p.encode("utf-8").decode("latin-1").translate(table): n for p, n in pieces.items()})


# --- merging ---------------------------------------------------------------------------------
def _build_alphabet(words: Iterable[str], initial_alphabet: Iterable[str] | None) -> list[str]:
    """Every character of the words and of the initial alphabet, sorted by code point:
    ["Ġdef", "x"], ["a"] -> ["a", "d", "e", "f", "x", "Ġ"]."""
    chars = set()
    for w in words:
        chars.update(w)
    for s in initial_alphabet or ():
        if not isinstance(s, str) or len(s) != 1:
            raise UserError(f"initial_alphabet must hold single characters, got {s!r}; "
                            f"pass e.g. BYTE_LEVEL_ALPHABET")
        chars.add(s)
    return sorted(chars)


def _count_pairs(words: list[list[int]], counts: list[int], V: int
                 ) -> tuple[dict[int, int], dict[int, set[int]]]:
    """Every adjacent pair's count over all words (weighted by word count), and the words holding it.

    A pair (left, right) is the int `left * V + right`. With V = 10, words [[1, 2, 1, 2], [2, 1]] and
    counts [3, 1]: pair_counts {12: 6, 21: 4} ((1, 2) twice in a word seen 3 times) and
    where {12: {0}, 21: {0, 1}}.
    """
    pair_counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for wi, w in enumerate(words):
        n = counts[wi]
        for j in range(len(w) - 1):
            key = w[j] * V + w[j + 1]
            pair_counts[key] = pair_counts.get(key, 0) + n
            s = where.get(key)
            if s is None:
                where[key] = {wi}
            else:
                s.add(wi)
    return pair_counts, where


def _merge_pair(words: list[list[int]], counts: list[int], pair_counts: dict[int, int],
                where: dict[int, set[int]], a: int, b: int, new: int, V: int) -> set[int]:
    """Replace (a, b) by `new` in every word holding it, left to right; return the pairs that gained counts.

    Only the neighbours of each merged occurrence change: the broken pairs lose the word's count, the
    new ones gain it. With the words of `_count_pairs` and (a, b, new) = (1, 2, 3): [[1, 2, 1, 2], [2, 1]]
    -> [[3, 3], [2, 1]]; pair_counts {12: 6, 21: 1, 31: 0, 33: 3} ((3, 1) existed between the two
    merges); returns {31, 33}. (1, 2) keeps its count, as in the reference: no word holds it any more.
    The left- and right-neighbour updates are spelled out twice on purpose: this is the innermost loop
    of training, and a helper call per update is a measurable cost in CPython.
    """
    get = pair_counts.get
    grown: set[int] = set()
    for wi in where.pop(a * V + b):
        w = words[wi]
        n = counts[wi]
        i = 0
        last = len(w) - 1
        while i < last:
            if w[i] == a and w[i + 1] == b:
                if i > 0:
                    p = w[i - 1]
                    k = p * V + a
                    pair_counts[k] -= n
                    k = p * V + new
                    pair_counts[k] = get(k, 0) + n
                    grown.add(k)
                    s = where.get(k)
                    if s is None:
                        where[k] = {wi}
                    else:
                        s.add(wi)
                w[i:i + 2] = (new,)
                last -= 1
                if i < last:
                    q = w[i + 1]
                    k = b * V + q
                    pair_counts[k] -= n
                    k = new * V + q
                    pair_counts[k] = get(k, 0) + n
                    grown.add(k)
                    s = where.get(k)
                    if s is None:
                        where[k] = {wi}
                    else:
                        s.add(wi)
            i += 1
    return grown


def _merge_loop(words: list[list[int]], counts: list[int], id_to_token: list[str], vocab_size: int,
                min_frequency: int, show_progress: bool) -> list[tuple[int, int]]:
    """BPE merges until the vocab is full; mutates `words` and `id_to_token`; returns merges as id pairs.

    A heap entry is `key - count * V**2` (see the module docstring): with V = 10, the pair (1, 2) seen 6
    times is 12 - 600 = -588, below (2, 1) seen 4 times (21 - 400 = -379), so it pops first; and
    -588 % 100 = 12 gives the pair back, -(-588 // 100) = 6 its count.
    """
    V = vocab_size  # every id stays below vocab_size, so left * V + right orders pairs like (left, right)
    VV = V * V
    pair_counts, where = _count_pairs(words, counts, V)
    heap = [key - n * VV for key, n in pair_counts.items()]
    heapq.heapify(heap)
    token_to_id = {t: i for i, t in enumerate(id_to_token)}
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=vocab_size - len(id_to_token), desc="merging", unit="merge", disable=not show_progress)
    while len(id_to_token) < vocab_size and heap:
        item = heapq.heappop(heap)
        key = item % VV
        count = -(item // VV)
        current = pair_counts[key]
        if count != current:  # stale: push back with the current count (counts only shrink)
            if current > 0:
                heapq.heappush(heap, key - current * VV)
            continue
        if count < min_frequency:
            break
        a, b = divmod(key, V)
        # A merged string that already exists keeps its id (the reference does this; byte-level
        # BPE never produces the same string twice in practice).
        token = id_to_token[a] + id_to_token[b]
        new = token_to_id.get(token)
        if new is None:
            new = len(id_to_token)
            id_to_token.append(token)
            token_to_id[token] = new
        merges.append((a, b))
        bar.update(1)
        for k in _merge_pair(words, counts, pair_counts, where, a, b, new, V):
            n = pair_counts[k]
            if n > 0:
                heapq.heappush(heap, k - n * VV)
    bar.close()
    return merges


def _check_vocab_size(vocab_size: int, special_tokens: list[str], alphabet: list[str]) -> None:
    # The reference silently returns just specials + alphabet here; a user asking for fewer tokens
    # than that has almost certainly mistyped the size.
    need = len(special_tokens) + len(alphabet)
    if vocab_size < need:
        raise UserError(f"vocab_size {vocab_size} is smaller than the special tokens ({len(special_tokens)}) "
                        f"plus the alphabet ({len(alphabet)} symbols); use a vocab_size of {need} or more")


def train_bpe(
    texts: Iterable[str | list[str]],
    vocab_size: int,
    special_tokens: Iterable[str] = ("<|endoftext|>",),
    min_frequency: int = 0,
    initial_alphabet: Iterable[str] | None = None,
    show_progress: bool = True,
    num_workers: int | None = None,
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer on `texts` (strings, or lists of strings).

    Same vocab and merges as the reference `train_new_from_iterator` (see the module docstring).
    The book passes `initial_alphabet=BYTE_LEVEL_ALPHABET` so that every byte has a token even
    if the corpus never contains it. `num_workers` processes count words (default: all cores).
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    initial_alphabet = _build_alphabet((), initial_alphabet)
    _check_vocab_size(vocab_size, special_tokens, initial_alphabet)  # fail before the long counting pass
    word_counts = count_words(texts, num_workers=num_workers, show_progress=show_progress)
    alphabet = _build_alphabet(word_counts, initial_alphabet)
    _check_vocab_size(vocab_size, special_tokens, alphabet)
    # Like the reference, a character that is also a special token keeps the special token's id.
    id_to_token = special_tokens + [c for c in alphabet if c not in special_tokens]
    char_id = {t: i for i, t in enumerate(id_to_token)}
    words = [[char_id[c] for c in w] for w in word_counts]
    counts = list(word_counts.values())
    merges = _merge_loop(words, counts, id_to_token, vocab_size, min_frequency, show_progress)
    vocab = {t: i for i, t in enumerate(id_to_token)}
    return Tokenizer(vocab, [(id_to_token[a], id_to_token[b]) for a, b in merges], tuple(special_tokens))


def train_new_from_iterator(
    base: Tokenizer,
    iterator: Iterable[str | list[str]],
    vocab_size: int,
    initial_alphabet: Iterable[str] | None = None,
    min_frequency: int = 0,
    show_progress: bool = True,
) -> Tokenizer:
    """The book's `tokenizer.train_new_from_iterator(texts, vocab_size)`: a new tokenizer of the same
    kind as `base` (byte-level BPE, the same special tokens) trained on `iterator`.

    As in `transformers`, the full 256-symbol byte alphabet is always part of the new vocab, so
    the result can encode any text; `initial_alphabet` may add more symbols.
    """
    alphabet = sorted(set(BYTE_LEVEL_ALPHABET) | set(initial_alphabet or ()))
    return train_bpe(iterator, vocab_size, special_tokens=tuple(base.special_tokens),
                     min_frequency=min_frequency, initial_alphabet=alphabet, show_progress=show_progress)


# --- the train-tokenizer command ----------------------------------------------------------------
def _training_texts(specs: list[str], n: int | None, text_field: str, stats: dict):
    """Texts of the datasets in order, at most n; plain .py files (or dirs of them) are read as-is."""
    for spec in specs:
        path = Path(spec).expanduser()
        py_files = None
        if path.is_file() and path.suffix == ".py":
            py_files = [path]
        elif path.is_dir() and not any(shards.is_data_file(p.name) for p in path.rglob("*")):
            py_files = sorted(p for p in path.rglob("*.py") if p.is_file())
        if py_files is not None:
            texts = _read_py_files(py_files, stats)
        else:
            texts = shards.iter_texts(spec, text_field=text_field)
        for text in texts:
            if n is not None and stats["examples"] >= n:
                return
            stats["examples"] += 1
            stats["chars"] += len(text) if isinstance(text, str) else 0
            yield text


def _read_py_files(files: list, stats: dict):
    for f in files:
        try:
            yield f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            stats["skipped"] += 1  # reported at the end: nothing is dropped silently


def train_tokenizer_command(args: argparse.Namespace) -> None:
    """`minicodeparrot train-tokenizer`: train on datasets or .py files, save, report what was read."""
    if args.n_examples is not None and args.n_examples < 1:
        raise UserError(f"--n-examples must be at least 1, got {args.n_examples}")
    t0 = time.perf_counter()
    stats = {"examples": 0, "chars": 0, "skipped": 0}
    texts = _training_texts(args.dataset, args.n_examples, args.text_field, stats)
    tok = train_bpe(texts, args.vocab_size, min_frequency=args.min_frequency,
                    initial_alphabet=BYTE_LEVEL_ALPHABET, show_progress=not args.no_progress,
                    num_workers=args.num_workers)
    if stats["examples"] == 0:
        raise UserError(f"no examples found in {' '.join(args.dataset)}; check --dataset and --text-field")
    tok.save_pretrained(args.output)
    skipped = f", skipped {stats['skipped']} .py files that are not UTF-8" if stats["skipped"] else ""
    seconds = time.perf_counter() - t0
    print(f"trained tokenizer: vocab {len(tok)}, {len(tok.merges)} merges, {stats['examples']} examples "
          f"({stats['chars'] / 1e6:.1f}M chars) in {seconds:.1f} s{skipped} -> {args.output}")
