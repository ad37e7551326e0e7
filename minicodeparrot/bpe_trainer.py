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

Two differences from the reference, both outside what real training hits:
- Unicode version: the reference's regex engine (Oniguruma) knows Unicode 16.0; Python's `regex`
  knows 17.0, in which ~17k code points became letters or numbers. `tokenizer.split_pieces`
  pins \\p{L} and \\p{N} to Unicode 16, so words and merges match on any text.
- Counts: the reference stores pair counts as 32-bit signed ints, so a pair seen more than
  2**31 times (" " + " " on many GB of code) wraps negative and is dropped. Python ints do not
  wrap; here such a pair is merged, as it should be.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

from minicodeparrot.errors import UserError
from minicodeparrot.tokenizer import Tokenizer, bytes_to_unicode, split_pieces

# GPT-2's 256 byte symbols, sorted by code point ('!' .. 'Ń'): the book's `initial_alphabet`.
BYTE_LEVEL_ALPHABET: list[str] = sorted(bytes_to_unicode().values())

# A text batch sent to one counting process; big enough that pickling and summing the returned
# Counters is small next to the regex work, small enough that both cores stay busy to the end.
CHUNK_CHARS = 1 << 21


# --- counting words --------------------------------------------------------------------------
def _iter_strings(texts: Iterable[str | list[str]]) -> Iterator[str]:
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
    chunk, size = [], 0
    for s in strings:
        chunk.append(s)
        size += len(s)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _count_pieces(chunk: list[str]) -> Counter:
    """Raw (unmapped) regex pieces of every text; the byte-level mapping is done once per distinct piece."""
    counts: Counter = Counter()
    for text in chunk:
        counts.update(split_pieces(text))
    return counts


def count_words(texts: Iterable[str | list[str]], num_workers: int | None = None,
                show_progress: bool = True) -> Counter:
    """word (byte-level string such as 'Ġdef') -> number of occurrences in all texts."""
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    chunks = _chunks(_iter_strings(texts), CHUNK_CHARS)
    bar = tqdm(desc="counting words", unit="MB", unit_scale=True, disable=not show_progress)
    pieces: Counter = Counter()

    def add(chunk_counts: Counter, n_chars: int) -> None:
        pieces.update(chunk_counts)
        bar.update(round(n_chars / 1e6, 3))

    first = next(chunks, None)
    second = next(chunks, None) if first is not None else None
    if second is None or num_workers <= 1:
        # Small input (or asked to): a process pool would cost more than it saves.
        for chunk in (c for c in (first, second) if c is not None):
            add(_count_pieces(chunk), sum(map(len, chunk)))
        for chunk in chunks:
            add(_count_pieces(chunk), sum(map(len, chunk)))
    else:
        import multiprocessing as mp

        sizes: dict[int, int] = {}

        def numbered() -> Iterator[tuple[int, list[str]]]:
            for i, chunk in enumerate(_prepend(first, second, chunks)):
                sizes[i] = sum(map(len, chunk))
                yield i, chunk

        with mp.get_context().Pool(num_workers) as pool:
            for i, chunk_counts in pool.imap_unordered(_count_numbered, numbered()):
                add(chunk_counts, sizes.pop(i))
    bar.close()

    # Distinct raw pieces map to distinct byte-level words (UTF-8 and the byte map are injective).
    table = bytes_to_unicode()  # str.translate table: chr(byte) -> symbol, applied to the latin-1 view
    return Counter({p.encode("utf-8").decode("latin-1").translate(table): n for p, n in pieces.items()})


def _prepend(first: list[str], second: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield second
    yield from rest


def _count_numbered(job: tuple[int, list[str]]) -> tuple[int, Counter]:
    return job[0], _count_pieces(job[1])


# --- merging ---------------------------------------------------------------------------------
def _build_alphabet(words: Iterable[str], initial_alphabet: Iterable[str] | None) -> list[str]:
    chars = set()
    for w in words:
        chars.update(w)
    for s in initial_alphabet or ():
        if not isinstance(s, str) or len(s) != 1:
            raise UserError(f"initial_alphabet must hold single characters, got {s!r}; "
                            f"pass e.g. BYTE_LEVEL_ALPHABET")
        chars.add(s)
    return sorted(chars)


def _merge_loop(words: list[list[int]], counts: list[int], id_to_token: list[str], vocab_size: int,
                min_frequency: int, show_progress: bool) -> list[tuple[int, int]]:
    """BPE merges until the vocab is full; mutates `words` and `id_to_token`; returns merges as id pairs."""
    V = vocab_size  # every id stays below vocab_size, so left * V + right orders pairs like (left, right)
    VV = V * V
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
    heap = [key - n * VV for key, n in pair_counts.items()]
    heapq.heapify(heap)

    token_to_id = {t: i for i, t in enumerate(id_to_token)}
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=vocab_size - len(id_to_token), desc="merging", unit="merge", disable=not show_progress)
    get = pair_counts.get
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

        grown: set[int] = set()
        for wi in where.pop(key):
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
        for k in grown:
            n = pair_counts[k]
            if n > 0:
                heapq.heappush(heap, k - n * VV)
    bar.close()
    return merges


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
    special_tokens = list(special_tokens)
    word_counts = count_words(texts, num_workers=num_workers, show_progress=show_progress)
    alphabet = _build_alphabet(word_counts, initial_alphabet)
    id_to_token = special_tokens + alphabet
    if vocab_size < len(id_to_token):
        raise UserError(
            f"vocab_size {vocab_size} is smaller than the {len(special_tokens)} special tokens plus the "
            f"{len(alphabet)}-symbol alphabet; use a vocab_size of {len(id_to_token)} or more"
        )
    char_id = {c: i for i, c in enumerate(id_to_token) if len(c) == 1 and i >= len(special_tokens)}
    words = [[char_id[c] for c in w] for w in word_counts]
    counts = list(word_counts.values())
    merges = _merge_loop(words, counts, id_to_token, vocab_size, min_frequency, show_progress)
    vocab = {t: i for i, t in enumerate(id_to_token)}
    return Tokenizer(vocab, [(id_to_token[a], id_to_token[b]) for a, b in merges], tuple(special_tokens))
