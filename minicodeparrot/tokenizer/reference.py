"""Byte-level BPE training and encoding in a few plain lines: read this first, then tokenizer/bpe.py
(the fast encoder) and tokenizer/trainer.py (the fast trainer).

Count the words (GPT-2 regex pieces, as byte-level symbols), then repeat: count every adjacent
pair of symbols over all words, weighted by how often each word occurs; merge the most frequent
pair everywhere; record it. Ties go to the pair whose (left id, right id) is smallest, as in the
reference trainer. This recounts every pair of every word for each merge, which is far too slow
for a real corpus; tokenizer/trainer.py gets the very same merges by updating the counts incrementally
(tests/tokenizer/test_trainer.py checks that the two agree).

Encoding a piece repeats one step: of the adjacent pairs that are merges, take the one learned
first (lowest rank) and merge it everywhere in the piece. tokenizer/bpe.py gives the same ids with
int-packed pairs and a word cache (tests/tokenizer/test_reference.py checks both against the
reference library).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from minicodeparrot.tokenizer.bpe import bytes_to_unicode, split_pieces

BYTE_SYMBOLS = sorted(bytes_to_unicode().values())


def count_pairs(words: dict[tuple[str, ...], int]) -> Counter:
    """How often each adjacent pair occurs, weighted by word count: like minbpe's `get_stats`.

    {("a", "a", "a"): 2, ("a", "b"): 1} -> {("a", "a"): 4, ("a", "b"): 1}
    (each "aaa" holds (a, a) twice: windows overlap.)
    """
    pairs = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:], strict=False):
            pairs[pair] += n
    return pairs


def train(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = ("<|endoftext|>",)
          ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE of `vocab_size` tokens trained on `texts`.

    ["aaa aaa"], 259 -> words {(a, a, a): 1, (Ġ, a, a, a): 1}; pairs (a, a): 4, (Ġ, a): 1, so merge
    (a, a) -> words (aa, a), (Ġ, aa, a); then (aa, a): 2 beats (Ġ, aa): 1. Ids: <|endoftext|> 0, the 256
    byte symbols 1..256, "aa" 257, "aaa" 258; merges [("a", "a"), ("aa", "a")].
    """
    byte_symbol = bytes_to_unicode()
    words = Counter()
    for text in texts:
        for piece in split_pieces(text):
            words[tuple(byte_symbol[b] for b in piece.encode("utf-8"))] += 1
    # Ids: the special tokens, then the 256 byte symbols in code-point order, then one per merge.
    tokens = list(special_tokens) + BYTE_SYMBOLS
    token_id = {t: i for i, t in enumerate(tokens)}
    merges = []
    while len(tokens) < vocab_size:
        pairs = count_pairs(words)
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], token_id[p[0]], token_id[p[1]]))
        new = best[0] + best[1]
        merges.append(best)
        token_id[new] = len(tokens)
        tokens.append(new)
        words = Counter({merge(word, best, new): n for word, n in words.items()})
    return token_id, merges


def merge(word: tuple[str, ...], pair: tuple[str, str], new: str) -> tuple[str, ...]:
    """`word` with every occurrence of `pair` replaced by `new`, left to right: (a, a, a) -> (aa, a)."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def encode_piece(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """BPE of one piece, like minbpe's `_encode_chunk`: merge the lowest-rank pair until none is left.

    With ranks {("a", "a"): 0, ("aa", "b"): 1}: (a, a, a, b) -> (aa, a, b), and no pair of that is a
    merge. With GPT-2's: (Ġ, s, a, y) -> (Ġs, a, y) -> (Ġs, ay) -> (Ġsay,).
    """
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:], strict=False), key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        symbols = merge(symbols, best, best[0] + best[1])
    return symbols


def encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """Token ids of `text` (no special tokens): split into pieces, BPE each piece on its own.

    With GPT-2's vocab and merges: "def say" -> pieces "def", " say" -> (def,) (Ġsay,) -> [4299, 910].
    """
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    byte_symbol = bytes_to_unicode()
    ids = []
    for piece in split_pieces(text):
        symbols = tuple(byte_symbol[b] for b in piece.encode("utf-8"))
        ids += [vocab[s] for s in encode_piece(symbols, ranks)]
    return ids
