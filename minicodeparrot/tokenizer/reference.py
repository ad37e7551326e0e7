"""Byte-level BPE training in a few plain lines: read this first, then the fast tokenizer/trainer.py.

Count the words (GPT-2 regex pieces, as byte-level symbols), then repeat: count every adjacent
pair of symbols over all words, weighted by how often each word occurs; merge the most frequent
pair everywhere; record it. Ties go to the pair whose (left id, right id) is smallest, as in the
reference trainer. This recounts every pair of every word for each merge, which is far too slow
for a real corpus; tokenizer/trainer.py gets the very same merges by updating the counts incrementally
(tests/tokenizer/test_trainer.py checks that the two agree).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from minicodeparrot.tokenizer.bpe import bytes_to_unicode, split_pieces

BYTE_SYMBOLS = sorted(bytes_to_unicode().values())


def train(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = ("<|endoftext|>",)
          ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE of `vocab_size` tokens trained on `texts`."""
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
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
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
