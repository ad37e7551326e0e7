"""The handwritten BPE trainer against the reference trainer, run live on the same texts.

Reference: `transformers.PreTrainedTokenizerFast(GPT-2 tokenizer.json).train_new_from_iterator(...)`
(the book's call) and, for min_frequency, `tokenizers`' BpeTrainer with the ByteLevel pre-tokenizer.
Parity means the same vocab (token -> id) and the same merges in the same order.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
import tokenizers
import transformers
from conftest import FIXTURES, stdlib_texts
from tokenizers.pre_tokenizers import ByteLevel

from minicodeparrot.errors import UserError
from minicodeparrot.tokenizer import reference as bpe_reference
from minicodeparrot.tokenizer import trainer as bpe_trainer
from minicodeparrot.tokenizer import unicode_tables
from minicodeparrot.tokenizer.trainer import BYTE_LEVEL_ALPHABET, train_bpe

EOS = "<|endoftext|>"


def _vocab_merges(backend) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


@functools.cache
def gpt2_fast():
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(FIXTURES / "tokenizer.json"))


def reference_book(texts, vocab_size: int):
    """The book's call: retrain GPT-2's tokenizer with the 256-symbol byte alphabet."""
    base = gpt2_fast()
    new = base.train_new_from_iterator(texts, vocab_size, initial_alphabet=ByteLevel.alphabet())
    return _vocab_merges(new.backend_tokenizer)


def reference_trainer(texts, vocab_size: int, min_frequency: int, initial_alphabet: bool = True):
    """`tokenizers`' BpeTrainer directly (the only way to set min_frequency on the book's path)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS], show_progress=False,
        initial_alphabet=ByteLevel.alphabet() if initial_alphabet else [],
    )
    tok.train_from_iterator(texts, trainer)
    return _vocab_merges(tok)


def ours(texts, vocab_size: int, **kw):
    tok = train_bpe(texts, vocab_size, show_progress=False, **kw)
    return tok.vocab, tok.merges


def assert_same(expected, got) -> None:
    (ev, em), (gv, gm) = expected, got
    first = next((i for i, (x, y) in enumerate(zip(em, gm, strict=False)) if x != y), None)
    assert first is None, f"merge {first} differs: reference {em[first]} ours {gm[first]}"
    assert len(gm) == len(em)
    assert gv == ev


# --- corpora ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def code_texts() -> list[str]:
    return stdlib_texts(60)  # ~1.3 MB of real Python


def mixed_texts(n_items: int = 300, seed: int = 0) -> list[str]:
    """Adversarial multilingual text: every class boundary the GPT-2 regex cares about.

    Includes letters and digits assigned in Unicode 17.0 (U+A7CE, U+088F, U+10940, U+16EA0, U+323B0,
    U+11DE0 digits): `regex` calls them \\p{L}/\\p{N}, the reference (Unicode 16) does not.
    """
    rng = random.Random(seed)
    new17 = ["\ua7ce", "\u088f", "\U00010940", "\U00016ea0", "\U000323b0", "\U00011de0", "\u0c5c"]
    words = [
        "привет", "мир", "Ёжик", "漢字", "中文字符", "ひらがな", "한국어", "🐍", "👍🏽", "👨\u200d👩\u200d👧",
        "é", "e\u0301", "٣٤٥", "१२३", "௧௨", "１２３", "Ⅻ", "½", "x²", "it's", "WE'LL", "they're", "'d", "def",
        "self", "print(", "0x1F", "3.14", "λ", "Ωmega", "straße", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "<|endoftext|>", "ab", "Ab",
    ]
    words += [f"ab{c}cd" for c in new17] + [f"12{c}34" for c in new17] + new17
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x1c", "\x0b", "\n    "]
    texts = []
    for _ in range(n_items):
        parts = []
        for _ in range(rng.randint(0, 60)):
            parts.append(rng.choice(words))
            parts.append(rng.choice(spaces))
        texts.append("".join(parts))
    return texts


# --- parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", [300, 1000, 8000])
def test_parity_stdlib_code(code_texts, vocab_size):
    assert_same(reference_book(code_texts, vocab_size), ours(code_texts, vocab_size,
                                                             initial_alphabet=BYTE_LEVEL_ALPHABET))


@pytest.mark.parametrize("vocab_size", [300, 600, 2000])
def test_parity_mixed_languages(vocab_size):
    texts = mixed_texts()
    expected = reference_book(texts, vocab_size)
    assert len(expected[1]) > 40  # the corpus is rich enough to exercise the merge order
    assert_same(expected, ours(texts, vocab_size, initial_alphabet=BYTE_LEVEL_ALPHABET))


def test_unicode17_letters_are_not_letters():
    # In Unicode 16 (the reference), U+A7CE is not a letter: "ab꟎cd" is three pieces, not one.
    texts = ["ab\ua7cecd xy\U00010940z 12\U00011de034"] * 50
    expected = reference_book(texts, 300)
    assert ("a", "b") in expected[1] and ("ab", "\u00ea") not in expected[1]
    assert_same(expected, ours(texts, 300, initial_alphabet=BYTE_LEVEL_ALPHABET))


def class_edge_texts(seed: int = 0) -> list[str]:
    """Words made of the code points at both ends of every range of unicode_tables, and just outside.

    These are where a `regex` release with other Unicode tables would disagree with the reference
    (a letter new in Unicode 17 sits right after a range of Unicode 16 letters, and so on).
    """
    rng = random.Random(seed)
    edges = set()
    for table in (unicode_tables.LETTERS, unicode_tables.NUMBERS, unicode_tables.SPACES):
        for a, b in table:
            edges.update({a - 1, a, b, b + 1})
    chars = [chr(c) for c in sorted(edges) if 0 <= c < 0x110000 and not 0xD800 <= c <= 0xDFFF]
    texts = []
    for _ in range(200):
        parts = []
        for c in rng.sample(chars, 40):
            shape = rng.choice(["ab{}cd", "12{}34", "!{}?", " {}", "{}{}", "x {} y", "'{}s"])
            parts.append(shape.format(c, c))
            parts.append(rng.choice([" ", "", "\n", "  "]))
        texts.append("".join(parts))
    return texts


def test_parity_on_unicode_class_edges():
    texts = class_edge_texts()
    expected = reference_book(texts, 1200)
    assert len(expected[1]) > 900
    assert_same(expected, ours(texts, 1200, initial_alphabet=BYTE_LEVEL_ALPHABET))


def test_reference_trainer_gives_the_same_merges(code_texts):
    # tokenizer/reference.py is the few-line version a reader starts with; the fast trainer must agree.
    texts = code_texts[:3] + mixed_texts(30)
    vocab, merges = bpe_reference.train(texts, 700)
    fast = train_bpe(texts, 700, initial_alphabet=BYTE_LEVEL_ALPHABET, show_progress=False, num_workers=1)
    assert len(merges) == 700 - 257
    assert (fast.vocab, fast.merges) == (vocab, merges)


@pytest.mark.parametrize("min_frequency", [2, 5])
def test_parity_min_frequency(code_texts, min_frequency):
    texts = code_texts[:20] + mixed_texts(100, seed=1)
    expected = reference_trainer(texts, 20000, min_frequency)
    assert len(expected[0]) < 20000  # stopped by min_frequency, not by the vocab size
    got = ours(texts, 20000, min_frequency=min_frequency, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert_same(expected, got)


def test_parity_without_initial_alphabet():
    texts = mixed_texts(100, seed=2)
    expected = reference_trainer(texts, 700, 0, initial_alphabet=False)
    assert len(expected[0]) - len(expected[1]) < 257  # only the characters seen form the alphabet
    assert_same(expected, ours(texts, 700))


def test_parity_many_small_random_corpora():
    rng = random.Random(3)
    for _ in range(15):
        texts = ["".join(rng.choice("aab c\n  zq'") for _ in range(rng.randint(0, 40))) for _ in range(30)]
        vocab_size = rng.randint(257, 320)
        got = ours(texts, vocab_size, initial_alphabet=BYTE_LEVEL_ALPHABET)
        assert_same(reference_book(texts, vocab_size), got)


# --- the rules, one at a time ----------------------------------------------------------------
def test_id_layout():
    vocab, merges = ours(["hello hello world"], 300, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert vocab[EOS] == 0
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])][1:257] == BYTE_LEVEL_ALPHABET
    assert vocab["!"] == 1 and vocab["Ń"] == 256
    for i, (a, b) in enumerate(merges):
        assert vocab[a + b] == 257 + i


def test_ties_go_to_smallest_ids_not_strings():
    # (z,z) and then (a,a) are merged first; after that (zz,q) and (aa,q) both occur 3 times.
    # 'aa' < 'zz' as strings, but zz has the smaller id (created first), so (zz, q) wins.
    texts = ["zz"] * 10 + ["aa"] * 9 + ["zzq"] * 3 + ["aaq"] * 3
    vocab, merges = ours(texts, 261, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert merges == [("z", "z"), ("a", "a"), ("zz", "q"), ("aa", "q")]
    assert_same(reference_book(texts, 261), (vocab, merges))


def test_ties_use_alphabet_order_not_byte_order():
    # Space (byte 32) is 'Ġ' = U+0120, so its id is above 'a' (byte 97): (a, b) wins the tie
    # against (Ġ, b) although the space byte is smaller.
    texts = [" b", "ab"]
    _, merges = ours(texts, 258, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert merges == [("a", "b")]
    assert_same(reference_book(texts, 258), ours(texts, 258, initial_alphabet=BYTE_LEVEL_ALPHABET))


def test_overlapping_pairs_are_counted():
    # (a, a) occurs 3 * 2 + 3 = 9 times with overlapping windows and beats (a, b) at 7; counted
    # without overlaps it would be 3 + 2 = 5 and lose. The merge itself is greedy left to right:
    # "aaa" -> "aa a" (3 x (aa, a)), "aaaa" -> "aa aa" (1 x (aa, aa)).
    texts = ["aaa"] * 3 + ["ab"] * 7 + ["aaaa"]
    _, merges = ours(texts, 260, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert merges == [("a", "a"), ("a", "b"), ("aa", "a")]
    assert_same(reference_book(texts, 260), ours(texts, 260, initial_alphabet=BYTE_LEVEL_ALPHABET))


def test_batches_equal_strings(code_texts):
    texts = code_texts[:15] + mixed_texts(40)
    flat = ours(texts, 1500, initial_alphabet=BYTE_LEVEL_ALPHABET)
    batches = [texts[i:i + 7] for i in range(0, len(texts), 7)]
    assert ours(iter(batches), 1500, initial_alphabet=BYTE_LEVEL_ALPHABET) == flat
    assert reference_book(batches, 1500) == flat


def test_pieces_never_cross_texts():
    # "ab" and "cd" as two texts never make the word "abcd"; as one text they do.
    assert ours(["ab", "cd"] * 3, 270)[1] == [("a", "b"), ("c", "d")]
    assert ours(["abcd"] * 3, 270)[1] == [("a", "b"), ("c", "d"), ("ab", "cd")]


def test_parallel_counting_matches(monkeypatch, code_texts):
    texts = code_texts[:25]
    one = ours(texts, 2000, num_workers=1)
    monkeypatch.setattr(bpe_trainer, "CHUNK_CHARS", 50_000)  # many chunks -> the process pool path
    assert ours(texts, 2000, num_workers=2) == one


def test_endoftext_in_training_text_is_plain_text():
    texts = ["x = 1\n<|endoftext|>\ny = '<|endoftext|>'\n"] * 40
    vocab, merges = ours(texts, 300, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert vocab[EOS] == 0
    assert "endoftext" in vocab and ("<", "|") in merges
    assert_same(reference_book(texts, 300), (vocab, merges))


def test_empty_corpus_gives_alphabet_only():
    vocab, merges = ours([], 1000, initial_alphabet=BYTE_LEVEL_ALPHABET)
    assert merges == [] and len(vocab) == 257
    assert_same(reference_book([], 1000), (vocab, merges))


def test_trained_tokenizer_encodes_like_reference(code_texts):
    tok = train_bpe(code_texts[:20], 1000, initial_alphabet=BYTE_LEVEL_ALPHABET, show_progress=False)
    ref = gpt2_fast().train_new_from_iterator(code_texts[:20], 1000, initial_alphabet=ByteLevel.alphabet())
    sample = code_texts[30]
    assert tok.encode(sample) == ref(sample)["input_ids"]


# --- bad input -------------------------------------------------------------------------------
def test_vocab_size_smaller_than_alphabet():
    def never_read():
        raise AssertionError("the size is checked before the corpus is read")
        yield "x"

    with pytest.raises(UserError, match=r"200 .* alphabet \(256 symbols\); use a vocab_size of 257"):
        train_bpe(never_read(), 200, initial_alphabet=BYTE_LEVEL_ALPHABET, show_progress=False)
    # Without an initial alphabet the characters seen decide: 1 special + 'a', 'b', 'c'.
    with pytest.raises(UserError, match="use a vocab_size of 4 or more"):
        train_bpe(["abc"], 3, show_progress=False)
    assert len(train_bpe(["abc"], 4, show_progress=False)) == 4


def test_bad_items_are_rejected():
    with pytest.raises(UserError, match="strings or lists of strings"):
        train_bpe([{"content": "x"}], 300, show_progress=False)
    with pytest.raises(UserError, match="single characters"):
        train_bpe(["x"], 300, initial_alphabet=["ab"], show_progress=False)


# --- the train-tokenizer command -------------------------------------------------------------
def test_cli_train_tokenizer_on_py_files_and_shards(tmp_path, capsys, code_texts):
    import gzip

    from minicodeparrot.cli import main
    from minicodeparrot.tokenizer.bpe import Tokenizer

    py_dir = tmp_path / "py"
    py_dir.mkdir()
    for i, text in enumerate(code_texts[:6]):
        (py_dir / f"m{i}.py").write_text(text, encoding="utf-8")
    (py_dir / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped and reported
    main(["train-tokenizer", "--dataset", str(py_dir), "--vocab-size", "600", "--output", str(tmp_path / "a"),
          "--no-progress"])
    out = capsys.readouterr().out
    assert "vocab 600, 343 merges, 6 examples" in out and "skipped 1 .py files" in out
    saved = Tokenizer.from_pretrained(tmp_path / "a")
    assert (saved.vocab, saved.merges) == reference_book(code_texts[:6], 600)

    shard = tmp_path / "data" / "file-000000000000.json.gz"
    shard.parent.mkdir()
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        for i, text in enumerate(code_texts[:6]):
            f.write(json.dumps({"repo_name": "r", "path": f"m{i}.py", "content": text}) + "\n")
    main(["train-tokenizer", "--dataset", str(shard.parent), "--n-examples", "3", "--vocab-size", "600",
          "--output", str(tmp_path / "b"), "--no-progress", "--num-workers", "1"])
    assert "3 examples" in capsys.readouterr().out
    assert Tokenizer.from_pretrained(tmp_path / "b").merges == reference_book(code_texts[:3], 600)[1]


def test_cli_train_tokenizer_errors(tmp_path, capsys):
    from minicodeparrot.cli import main

    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", "--dataset", str(tmp_path / "a.py"), "--vocab-size", "100",
              "--output", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 2
    assert "use a vocab_size of 257 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
