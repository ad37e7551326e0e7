"""The plain encoder of tokenizer/reference.py against the fast one and the reference library."""

from __future__ import annotations

import tokenizers
from conftest import FIXTURES, stdlib_texts

from minicodeparrot.tokenizer import reference
from minicodeparrot.tokenizer.bpe import Tokenizer

# Code, then prose in scripts whose pieces need many merges or are cut by the fast path.
TEXTS = [*stdlib_texts(limit=3),
         "naïve café, Ελληνικά, Привет, мир! 日本語のテキスト, 中文字符 の魔法 ック 👩‍💻 \u3000x  \n\n"]


def test_plain_encoder_gives_the_fast_and_the_reference_ids():
    gpt2 = Tokenizer.from_pretrained(FIXTURES)
    ref = tokenizers.Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    for text in TEXTS:
        plain = reference.encode(text, gpt2.vocab, gpt2.merges)
        assert plain == ref.encode(text, add_special_tokens=False).ids
        assert plain == gpt2.encode(text, parse_special=False)


def test_plain_encoder_on_a_tokenizer_it_trained():
    vocab, merges = reference.train(TEXTS[:2], 400)
    fast = Tokenizer(vocab, merges)
    for text in TEXTS:
        assert reference.encode(text, vocab, merges) == fast.encode(text, parse_special=False)


def test_encode_piece_merges_the_lowest_rank_first_left_to_right():
    ranks = {("a", "a"): 0, ("aa", "b"): 1, ("a", "b"): 2}
    assert reference.encode_piece(("a", "a", "a", "b"), ranks) == ("aa", "ab")
    assert reference.encode_piece(("a", "a", "b"), ranks) == ("aab",)
    assert reference.count_pairs({("a", "a", "a"): 2, ("a", "b"): 1}) == {("a", "a"): 4, ("a", "b"): 1}
