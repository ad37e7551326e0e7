"""The tokenizer against the book's facts and, live, against the reference `tokenizers` library."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import regex
import tokenizers
import transformers
from conftest import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from minicodeparrot.errors import UserError
from minicodeparrot.tokenizer import bpe as tk
from minicodeparrot.tokenizer import unicode_tables
from minicodeparrot.tokenizer.bpe import Tokenizer, bytes_to_unicode, pre_tokenize, split_pieces
from minicodeparrot.tokenizer.fast import parallel_encode, piece_cuts
from minicodeparrot.tokenizer.fast import split as fast_split
from minicodeparrot.tokenizer.trainer import train_new_from_iterator

SAY_HELLO = 'def say_hello():\n    print("Hello, World!") # Print it\n\nsay_hello()\n'
BOOK_PRE_TOKENS = [
    ("def", (0, 3)), ("Ġsay", (3, 7)), ("_", (7, 8)), ("hello", (8, 13)), ("():", (13, 16)),
    ("ĊĠĠĠ", (16, 20)), ("Ġprint", (20, 26)), ('("', (26, 28)), ("Hello", (28, 33)), (",", (33, 34)),
    ("ĠWorld", (34, 40)), ('!")', (40, 43)), ("Ġ#", (43, 45)), ("ĠPrint", (45, 51)), ("Ġit", (51, 54)),
    ("Ċ", (54, 55)), ("Ċ", (55, 56)), ("say", (56, 59)), ("_", (59, 60)), ("hello", (60, 65)),
    ("()", (65, 67)), ("Ċ", (67, 68)),
]
BOOK_TOKENS = [
    "def", "Ġsay", "_", "hello", "():", "Ċ", "Ġ", "Ġ", "Ġ", "Ġprint", '("', "Hello", ",", "ĠWorld",
    '!"', ")", "Ġ#", "ĠPrint", "Ġit", "Ċ", "Ċ", "say", "_", "hello", "()", "Ċ",
]
BOOK_IDS = [
    4299, 910, 62, 31373, 33529, 198, 220, 220, 220, 3601, 7203, 15496, 11, 2159, 2474, 8, 1303,
    12578, 340, 198, 198, 16706, 62, 31373, 3419, 198,
]

# Every Unicode whitespace kind (and the U+001C..U+001F separators that `str.isspace` calls space
# but GPT-2's engines do not), line endings, scripts, contractions, other-script digits, code points
# assigned in Unicode 17 (letters for `regex`, not for the reference), emoji with ZWJ and modifiers.
WHITESPACE = "\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006" \
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\u180e\u200b\ufeff"
ADVERSARIAL = [
    "",
    " ",
    "   ",
    "\n",
    WHITESPACE,
    "".join(f"x{w}y {w}{w}z" for w in WHITESPACE),
    "line one\r\nline two\r\n\r\n\tindented\r\n",
    "\t\tdef f(x):\n\t\t\treturn x  \n\n\n   ",
    "if x:\n    return 1\n  \n\t \t\n",
    "trailing spaces   ",
    "emoji 🐍🦜 👩‍💻 👍🏽 🇫🇷 ❤️",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 क्षि",
    "CJK 中文字符 日本語のテキスト 한국어 텍스트",
    "Кириллица: Привет, мир! ёЁ",
    "she's they'll I'm we're you've he'd it't SHE'S THEY'LL I'M 'LL 's",
    "digits: ٠١٢٣ ०१२३ ๐๑๒ ①②③ Ⅻ ½ ¹²³ 𝟘𝟙𝟚",
    "unicode 17: \u088f \ua7ce\ua7cf x\ua7d2y 1\U00010940 \U000323b0\U000323b1 \U0001e6c0!",
    "before<|endoftext|>after <|endoftext|><|endoftext|>\n<|endoftext|>",
    "<|endoftext|>",
    "<|endoftext",
    "private use \ue000 noncharacter \ufdd0 \U0010ffff max",
    "nulls \x00\x01\x7f\x80\x9f control",
    "mixed 'ss'''''' ''' !!! ... ??? ### @@@ $$$ %%%",
    "x = 10_000 + 3.14e-10 - 0xFF // 0b1010",
]


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def ref(gpt2_dir):
    return tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))


REF_PRE = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# --- the book's facts ----------------------------------------------------------------------------
def test_bytes_to_unicode_facts():
    m = bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    printable = [b for b in range(256) if m[b] == chr(b)]
    assert len(printable) == 188
    assert [m[b] for b in range(256) if b not in printable] == [chr(256 + n) for n in range(68)]
    alphabet = sorted(m.values())
    assert alphabet[0] == "!" and alphabet[-1] == "Ń"
    facts = {32: "Ġ", 10: "Ċ", 9: "ĉ", 13: "č", 0: "Ā", 127: "ġ", 128: "Ģ", 160: "ł", 173: "Ń", 255: "ÿ"}
    assert {b: m[b] for b in facts} == facts
    assert list("€".encode()) == [226, 130, 172]
    assert "".join(m[b] for b in "€".encode()) == "âĤ¬"


def test_book_say_hello(gpt2):
    assert pre_tokenize(SAY_HELLO) == BOOK_PRE_TOKENS
    assert gpt2.tokenize(SAY_HELLO) == BOOK_TOKENS
    assert gpt2.encode(SAY_HELLO) == BOOK_IDS
    assert gpt2.decode(BOOK_IDS) == SAY_HELLO
    assert len(gpt2) == 50257 and len(gpt2.merges) == 50000
    assert gpt2.eos_token == "<|endoftext|>" and gpt2.eos_token_id == 50256


# --- pre-tokenizer parity --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ADVERSARIAL)
def test_pre_tokenize_matches_reference(text):
    assert pre_tokenize(text) == REF_PRE.pre_tokenize_str(text)
    assert "".join(split_pieces(text)) == text


def _probe(chars) -> str:
    # Each character after a letter, a digit, punctuation, a space and an apostrophe: the pieces
    # differ from the reference's whenever its \p{L}, \p{N} or \s class differs.
    return "".join(f"a{c}1{c}!{c} {c}'{c}" for c in chars)


ALL_CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]  # surrogates are not text


def _class_probes(run: int = 64) -> list[str]:
    """Every code point, after a probe character of the class our tables give it, `run` at a time.

    "a" + letters is one piece for the reference iff it calls every one of them a letter; likewise
    "1" + numbers, "!" + the rest; spaces (25 code points) are probed one by one between letters.
    As the four classes partition the code points, equal pieces for all probes mean equal classes.
    """
    head = {}
    tables = unicode_tables.LETTERS, unicode_tables.NUMBERS, unicode_tables.SPACES
    for table, h in zip(tables, "a1 ", strict=True):
        for a, b in table:
            head.update(dict.fromkeys(range(a, b + 1), h))
    groups: dict[str, list[str]] = {"a": [], "1": [], "!": [], " ": []}
    for cp in ALL_CODE_POINTS:
        groups[head.get(cp, "!")].append(chr(cp))
    probes = [f"x{c}y{c}{c}z {c}" for c in groups.pop(" ")]
    for probe, chars in groups.items():
        probes += [probe + "".join(chars[i : i + run]) for i in range(0, len(chars), run)]
    return probes


def test_every_code_point_in_the_reference_class():
    """All 1,112,064 code points: pieces and offsets as the reference's pre-tokenizer, ids as its encode.

    The probes are joined ("\n" between them ends any piece) into a few long texts; only a text
    that differs is split up to name the first probe at fault.
    """
    ref = tokenizers.Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(FIXTURES)
    probes = _class_probes()

    def same(text: str) -> bool:
        pieces_same = pre_tokenize(text) == REF_PRE.pre_tokenize_str(text)
        return pieces_same and ours.encode(text) == ref.encode(text).ids

    n_space = sum(p.startswith("x") for p in probes)
    assert n_space + sum(len(p) - 1 for p in probes if not p.startswith("x")) == len(ALL_CODE_POINTS)
    for i in range(0, len(probes), 4096):
        batch = probes[i : i + 4096]
        text = "\n".join(batch)
        if not same(text):
            bad = next(p for p in batch if not same(p))
            bad_cp = next(c for c in bad[1:] if not same(bad[0] + c))
            pytest.fail(f"U+{ord(bad_cp):04X} is in a different class than in the reference (probe {bad!r})")


def test_pattern_has_no_unicode_property_class():
    # Only explicit escapes: \x, \u, \U code points and \t \n \r. No \p{..}, \s, \w, \d, whose meaning
    # would come from the regex engine's own Unicode tables.
    for pattern in (tk.SPLIT_PATTERN, fast_split.ASCII_PATTERN, tk._BMP_RE.pattern):
        assert set(regex.findall(r"\\(.)", pattern)) <= {"x", "u", "U", "t", "n", "r"}
    assert "\\p" in tk.GPT2_PATTERN  # (the check above can fail)
    assert unicode_tables.REFERENCE == f"tokenizers {tokenizers.__version__}", (
        "the installed reference differs from the one the tables were made from: "
        "run scripts/make_unicode_tables.py (the sweep above says whether anything changed)")


def test_any_regex_engine_gives_the_same_pieces():
    text = _probe([chr(c) for c in range(0, 0x3000, 7)]) + "".join(ADVERSARIAL)
    expected = split_pieces(text)
    assert regex.compile(tk.SPLIT_PATTERN).findall(text) == expected
    assert regex.compile(tk.SPLIT_PATTERN, regex.V1).findall(text) == expected


def test_ascii_fast_path_equals_unicode_pattern():
    # The `re` ASCII pattern must agree with the table pattern on every ASCII text.
    ascii_chars = [chr(c) for c in range(128)]
    text = _probe(ascii_chars) + "".join(random.Random(1).choices(ascii_chars, k=20_000))
    assert fast_split.ASCII_RE.findall(text) == tk._SPLIT_RE.findall(text)


def test_bmp_fast_path_equals_unicode_pattern():
    # The pattern for text without astral characters must agree with the full one on every BMP code point.
    bmp = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    text = _probe(bmp) + "".join(random.Random(4).choices(bmp, k=20_000))
    assert tk._ASTRAL.search(text) is None
    assert tk._BMP_RE.findall(text) == tk._SPLIT_RE.findall(text)
    assert split_pieces(text + "🐍") == tk._SPLIT_RE.findall(text + "🐍")  # astral: another path, same pieces


# --- encode / decode parity ---------------------------------------------------------------------
def test_encode_matches_reference_on_stdlib(gpt2, ref, small_stdlib_texts):
    texts = small_stdlib_texts
    expected = [e.ids for e in ref.encode_batch(texts)]
    assert [gpt2.encode(t) for t in texts] == expected
    assert gpt2.encode_batch(texts, num_workers=1) == expected
    for t, ids in zip(texts[:50], expected[:50], strict=True):
        assert gpt2.decode(ids) == t


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_encode_decode_adversarial(gpt2, ref, text):
    ids = gpt2.encode(text)
    assert ids == ref.encode(text).ids
    assert gpt2.tokenize(text) == ref.encode(text).tokens
    assert gpt2.decode(ids) == text == ref.decode(ids, skip_special_tokens=False)


def test_parse_special(gpt2, gpt2_dir):
    text = "a<|endoftext|>b <|endoftext|>\n<|endoftext|><|endoftext|>"
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    # parse_special=False equals the reference without its added token: plain text pieces.
    data = json.loads((gpt2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = []
    ref_plain = tokenizers.Tokenizer.from_str(json.dumps(data))
    plain = gpt2.encode(text, parse_special=False)
    assert 50256 not in plain and plain == ref_plain.encode(text).ids
    assert gpt2.tokenize("a<|endoftext|>b", parse_special=False)[:3] == ["a", "<", "|"]
    assert gpt2.decode(plain) == text
    assert gpt2.encode_batch([text], parse_special=False) == [plain]


def test_decode_invalid_utf8_like_reference(gpt2, ref):
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(len(gpt2)) for _ in range(rng.randrange(1, 12))]
        assert gpt2.decode(ids) == ref.decode(ids, skip_special_tokens=False)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_property_roundtrip_and_parity(gpt2_dir, text):
    tok, ref = _cached(gpt2_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == ref.encode(text).ids


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    " ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "x", "é", "1", "٣", "!", "🐍",
    "\u0301", "\ua7ce", "\x1c", "\u3000", "<|endoftext|>", "def", "_"])).map("".join))
def test_property_tricky_alphabet(gpt2_dir, text):
    tok, ref = _cached(gpt2_dir)
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text, parse_special=False)) == text


_CACHE: dict = {}


def _cached(gpt2_dir):
    # hypothesis forbids function-scoped fixtures; load once per session here.
    if not _CACHE:
        _CACHE["pair"] = (Tokenizer.from_pretrained(gpt2_dir),
                          tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json")))
    return _CACHE["pair"]


# --- batches ---------------------------------------------------------------------------------------
def test_encode_batch_processes_keep_order(gpt2, small_stdlib_texts, monkeypatch):
    monkeypatch.setattr(parallel_encode, "PARALLEL_MIN_CHARS", 0)
    texts = small_stdlib_texts[:40] + ["", "<|endoftext|>"]
    assert gpt2.encode_batch(texts, num_workers=2) == [gpt2.encode(t) for t in texts]


_DISPOSITIONS = """
import signal, sys
from minicodeparrot.tokenizer.fast import parallel_encode

def dispositions(text, parse_special=True):  # stands in for Tokenizer.encode in a pool worker
    return [signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN]

signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer's: only sets a flag
print(parallel_encode.encode_batch(dispositions, ["x" * (1 << 19)] * 4, num_workers=2))  # 2 MiB: a pool
"""


def test_encode_batch_workers_do_not_inherit_a_trainers_sigterm_handler(tmp_path):
    """Inherited by the pool's forked workers, the trainer's flag-only SIGTERM handler made
    Pool.terminate() (which stops them with SIGTERM) wait forever: the first batch of a codeparrot-small
    run never came. Workers must take SIGTERM's default action and leave SIGINT to the parent."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(tk.__file__).parent.parent)}
    try:
        r = subprocess.run([sys.executable, "-c", _DISPOSITIONS], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=180)  # a hang is forever; a busy machine is only slow
    except subprocess.TimeoutExpired:
        pytest.fail("encode_batch hung: its pool workers kept the parent's SIGTERM handler")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str([[True, True]] * 4)


# --- loading and saving ----------------------------------------------------------------------------
def test_load_formats_agree(gpt2_dir, gpt2, tmp_path):
    # vocab.json + merges.txt, and tokenizer.json with the old "a b" merge strings.
    (tmp_path / "vm").mkdir()
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "vm" / f).write_bytes((gpt2_dir / f).read_bytes())
    from_vm = Tokenizer.from_pretrained(tmp_path / "vm")
    data = json.loads((gpt2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    from_old = Tokenizer.from_pretrained(tmp_path / "old")
    for tok in (from_vm, from_old, Tokenizer.from_pretrained(gpt2_dir / "tokenizer.json")):
        assert tok.vocab == gpt2.vocab and tok.merges == gpt2.merges
        assert tok.eos_token_id == 50256 and tok.encode(SAY_HELLO + "<|endoftext|>") == BOOK_IDS + [50256]


def test_save_pretrained_loads_in_reference_libraries(gpt2, tmp_path, small_stdlib_texts):
    out = gpt2.save_pretrained(tmp_path / "saved")
    files = {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} == files
    again = Tokenizer.from_pretrained(out)
    assert again.vocab == gpt2.vocab and again.merges == gpt2.merges
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    rt = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    text = small_stdlib_texts[0] + "<|endoftext|>" + ADVERSARIAL[5] + ADVERSARIAL[10]
    ids = gpt2.encode(text)
    assert hf(text)["input_ids"] == ids == rt.encode(text).ids
    assert hf.decode(ids) == text
    # vocab.json + merges.txt alone give the same tokenizer too.
    (out / "tokenizer.json").unlink()
    assert Tokenizer.from_pretrained(out).encode(text) == ids


def test_small_custom_tokenizer_roundtrip(tmp_path):
    # A vocab without <|endoftext|>: it is appended, like the reference's add_special_tokens.
    base = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(base)}
    merges = [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("d", "e"), ("de", "f")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(vocab, merges)
    assert tok.eos_token_id == 260
    assert tok.tokenize("def f():\n        pass") == [
        "def", "Ġ", "f", "(", ")", ":", "Ċ", "ĠĠĠĠ", "ĠĠ", "Ġ", "Ġ", "p", "a", "s", "s"]
    tok.save_pretrained(tmp_path)
    rt = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["def f():\n        pass\n", "aaa   bbb<|endoftext|>", *ADVERSARIAL]:
        assert tok.encode(text) == rt.encode(text).ids
        assert Tokenizer.from_pretrained(tmp_path).encode(text) == tok.encode(text)


# --- user mistakes ---------------------------------------------------------------------------------
def test_bad_inputs_raise_user_error(gpt2_dir, gpt2, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": ', encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"pre_tokenizer": {"type": "ByteLevel"}}', encoding="utf-8")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}', encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(UserError, match="merges.txt:2"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing from the vocab"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(UserError, match="JSON object"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="same id"):
        Tokenizer({"a": 0, "b": 0}, [])
    with pytest.raises(UserError, match="not in this tokenizer"):
        gpt2.decode([10**6])


# --- training hook ---------------------------------------------------------------------------------
def test_train_new_from_iterator(gpt2, small_stdlib_texts):
    new = train_new_from_iterator(gpt2, iter(small_stdlib_texts[:20]), vocab_size=400, show_progress=False)
    assert isinstance(new, Tokenizer) and len(new) == 400
    assert new.vocab["<|endoftext|>"] == 0 and new.eos_token_id == 0
    text = small_stdlib_texts[0]
    assert new.decode(new.encode(text)) == text
    assert len(new.encode(text)) < len(text)


# --- the word cache ----------------------------------------------------------------------------------
def test_word_cache_limit_never_changes_results(gpt2_dir, ref, small_stdlib_texts, monkeypatch):
    # A handful of entries: nearly every text brings more new pieces than fit, next to pieces cached
    # by the text before (this raised KeyError once, when the cache was cleared between the two).
    monkeypatch.setattr(tk, "CACHE_LIMIT", 5)
    tok = Tokenizer.from_pretrained(gpt2_dir)
    rng = random.Random(3)
    texts = small_stdlib_texts[:30] + ADVERSARIAL + ["def f(x):\n    return x", "x", "x y", "y z w v u t"]
    rng.shuffle(texts)
    for text in texts + texts[::-1]:
        before = len(tok._cache)
        assert tok.encode(text) == ref.encode(text).ids
        # What the limit let stay, plus this text's pieces (and parts of pieces): bounded.
        assert len(tok._cache) <= (before if before <= 5 else 0) + 2 * len(text)
    assert tok.encode_with_offsets(texts[0])[0] == ref.encode(texts[0]).ids


# --- offsets -------------------------------------------------------------------------------------------
OFFSET_TEXTS = [
    *ADVERSARIAL,
    "naïve café, Ελληνικά, עברית ومرحبا, हिन्दी, ภาษาไทย, 日本語とカタカナ, 한국어",
    "🐍🦜 👩‍👩‍👧‍👦 👍🏿 🇯🇵🇫🇷 🏴‍☠️ ⌚️ 1️⃣",
    "e\u0301\u0302\u0303 a\u0308\u0323 o\u0338 Z\u0351\u0352\u0353\u0354 ก\u0e48\u0e49 ﷺ",
    "簿羊抉吩骉瘇豿夓凶澥 𠀀𠀁𪛖 \U0010fffd\U000e0001\U000f0000",  # rare: tokens cut inside characters
    "x€€€y €x x€ ‰‱ \u00ad\u200d\u2060",
]


def _small_tokenizer() -> Tokenizer:
    # Few merges: most non-ASCII characters stay split into byte tokens, some merges join bytes of two
    # characters, so token boundaries fall inside characters (the reference's offsets then widen).
    from minicodeparrot.tokenizer.trainer import train_bpe

    return train_bpe(OFFSET_TEXTS * 3, 420, initial_alphabet=sorted(bytes_to_unicode().values()),
                     show_progress=False, num_workers=1)


@pytest.mark.parametrize("which", ["gpt2", "small"])
def test_encode_with_offsets_matches_reference(gpt2, which, tmp_path):
    tok = gpt2 if which == "gpt2" else _small_tokenizer()
    rt = tokenizers.Tokenizer.from_file(str(tok.save_pretrained(tmp_path) / "tokenizer.json"))
    for text in OFFSET_TEXTS:
        enc = rt.encode(text)
        ids, offsets = tok.encode_with_offsets(text)
        assert (ids, offsets) == (enc.ids, enc.offsets), text
        assert tok.convert_ids_to_tokens(ids) == enc.tokens
        assert ids == tok.encode(text)
    plain = "a<|endoftext|>b"
    assert tok.encode_with_offsets(plain, parse_special=False)[0] == tok.encode(plain, parse_special=False)
    assert tok.encode_with_offsets(plain) == (rt.encode(plain).ids, rt.encode(plain).offsets)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_property_offsets(gpt2_dir, text):
    tok, ref = _cached(gpt2_dir)
    enc = ref.encode(text)
    assert tok.encode_with_offsets(text) == (enc.ids, enc.offsets)


# --- cutting long pieces (tokenizer/fast/piece_cuts.py) ---------------------------------------------
CUT_ALPHABET = sorted(set("".join(OFFSET_TEXTS[-5:]) + "Привет мир中文字符日本語€ ") - set("\n"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(CUT_ALPHABET), max_size=40).map("".join))
def test_property_cut_pieces_keep_reference_ids(gpt2_dir, tmp_path_factory, text):
    # Both GPT-2 and a small vocab whose merges join bytes of neighbouring characters (so some
    # positions between two characters are crossed by a token and must not be cut).
    for tok, ref in _cut_pairs(gpt2_dir, tmp_path_factory):
        assert tok.encode(text) == ref.encode(text).ids


def test_trie_pattern_finds_the_longest_word_at_each_start():
    rng = random.Random(5)
    for _ in range(200):
        alphabet = b"ab\xe3\x81"
        words = list({bytes(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 8))})
        data = bytes(rng.choices(alphabet, k=30))
        pattern = re.compile(piece_cuts.trie_pattern(words))
        for start in range(len(data)):
            longest = max((w for w in words if data.startswith(w, start)), key=len, default=None)
            m = pattern.match(data, start)
            assert (m and m.group()) == longest, (words, data[start:])


def test_crossing_tokens_are_found_where_they_overlap():
    # "の魔" and "魔法" (a small vocab holding both) overlap in "の魔法": both boundaries are blocked.
    index = piece_cuts.CrossIndex([t.encode() for t in ["の魔", "魔法", "中"]])
    assert index.blocked("の魔法".encode()) == {3, 6}
    assert not index.free("の魔法") and index.free("中文") and not index.free("中 文")
    assert index.segments("中の魔法文") == ["中", "の魔法", "文"]


def _cut_pairs(gpt2_dir, tmp_path_factory):
    if "cut" not in _CACHE:
        small = _small_tokenizer()
        path = small.save_pretrained(tmp_path_factory.mktemp("small")) / "tokenizer.json"
        _CACHE["cut"] = [_cached(gpt2_dir), (small, tokenizers.Tokenizer.from_file(str(path)))]
    for tok, _ in _CACHE["cut"]:
        tok._cache.clear()  # every example cuts its pieces anew
    return _CACHE["cut"]


def test_ids_in_the_surrogate_range_survive_the_word_cache():
    # The word cache keeps ids as chr(id); ids 0xD800..0xDFFF are surrogate code points (a vocab of 64k).
    symbol = bytes_to_unicode()
    vocab = {c: 0xD780 + i for i, c in enumerate(sorted(symbol.values()))}
    tok = Tokenizer(vocab, [])
    text = "Hi ÿ\x7f 中"
    expected = [vocab[symbol[b]] for b in text.encode("utf-8")]
    assert max(expected) >= 0xD800 and tok.encode(text) == expected
    assert tok.decode(expected) == text
