"""The book-style tokenizer report and the `tokenize` / `tokenizer-report` commands."""

from __future__ import annotations

import io
import json
import keyword

import pytest
import tokenizers

from minicodeparrot.cli import main
from minicodeparrot.tokenizer.bpe import Tokenizer
from minicodeparrot.tokenizer.report import (
    SNIPPET,
    longest_tokens,
    make_report,
    merged_tokens,
    missing_keywords,
    sample_texts,
)
from minicodeparrot.tokenizer.trainer import train_new_from_iterator


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


def test_report_parts_match_reference(gpt2, gpt2_dir, small_stdlib_texts):
    ref = tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    ref_vocab = ref.get_vocab()
    assert missing_keywords(gpt2) == [kw for kw in keyword.kwlist if kw not in ref_vocab]
    assert missing_keywords(gpt2) == ["async", "await", "elif", "finally", "nonlocal", "yield"]
    lines = (gpt2_dir / "merges.txt").read_text("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert merged_tokens(gpt2)[:4] == [" t", " a", "he", "in"]
    assert merged_tokens(gpt2)[-1] == ref.decode([ref_vocab[merges[-1][0] + merges[-1][1]]])
    longest = longest_tokens(gpt2, 5)
    top = max(len(ref.decode([i])) for t, i in ref_vocab.items() if t != "<|endoftext|>")
    assert len(longest) == 5 and len(longest[0]) == top and longest[0] == " " + "=" * (top - 1)
    texts = small_stdlib_texts[:30]
    rep = make_report(gpt2, texts, other=gpt2)
    n_ref = sum(len(e.ids) for e in ref.encode_batch(texts))
    assert rep.n_tokens == n_ref == rep.other_tokens
    assert rep.chars_per_token == pytest.approx(sum(map(len, texts)) / n_ref)
    assert rep.snippet_tokens[5:9] == ["Ċ", "Ġ", "Ġ", "Ġ"]


def test_trained_tokenizer_keeps_indentation_and_beats_gpt2(gpt2, small_stdlib_texts):
    new = train_new_from_iterator(gpt2, small_stdlib_texts[:60], vocab_size=2000, show_progress=False)
    rep = make_report(new, small_stdlib_texts[100:130], other=gpt2)
    assert "ĊĠĠĠ" in rep.snippet_tokens  # the book: a code tokenizer keeps the indentation whole
    assert rep.n_tokens < rep.other_tokens  # even a 2000-token code vocab beats GPT-2 on code


def test_sample_texts_sources(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "pkg" / "b.py").write_text("y = 2\n", encoding="utf-8")
    (tmp_path / "pkg" / "bad.py").write_bytes(b"\xff\xfe\x00")
    assert sample_texts(str(tmp_path / "pkg"), 10) == ["x = 1\n", "y = 2\n"]
    assert sample_texts(str(tmp_path / "pkg" / "b.py"), 10) == ["y = 2\n"]
    assert len(sample_texts(None, 3)) == 3  # the standard library
    shard = tmp_path / "data.jsonl"
    records = "".join(json.dumps({"content": f"print({i})\n"}) + "\n" for i in range(5))
    shard.write_text(records, encoding="utf-8")
    assert sample_texts(str(shard), 3) == ["print(0)\n", "print(1)\n", "print(2)\n"]


def test_cli_tokenize(gpt2_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "snippet.py"
    f.write_text(SNIPPET, encoding="utf-8")
    main(["tokenize", str(f), "--tokenizer", str(gpt2_dir)])
    out = capsys.readouterr().out
    assert out.startswith("['def', 'Ġsay', '_', 'hello', '():', 'Ċ', 'Ġ', 'Ġ', 'Ġ', 'Ġprint',")
    monkeypatch.setattr("sys.stdin", io.StringIO("a<|endoftext|>"))
    main(["tokenize", "--tokenizer", str(gpt2_dir), "--ids"])
    assert capsys.readouterr().out == "[64, 50256]\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("a<|endoftext|>"))
    main(["tokenize", "-", "--tokenizer", str(gpt2_dir), "--ids", "--no-special"])
    assert 50256 not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv", [
    ["tokenize", "missing.py", "--tokenizer", "TOK"],
    ["tokenize", "-", "--tokenizer", "no-such-dir"],
    ["tokenizer-report", "no-such-dir"],
    ["tokenizer-report", "TOK", "--n", "0"],
])
def test_cli_errors_exit_2(argv, gpt2_dir, capsys, monkeypatch, tmp_path):
    # "no-such-dir" could be a Hub repo id: never ask a real Hub here (tests/tokenizer/test_files.py does
    # that against the loopback server).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    argv = [str(gpt2_dir) if a == "TOK" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_tokenizer_report(gpt2_dir, tmp_path, capsys):
    (tmp_path / "m.py").write_text("async def f():\n    await g()\n" * 20, encoding="utf-8")
    main(["tokenizer-report", str(gpt2_dir), "--dataset", str(tmp_path), "--n", "5",
          "--compare-with", str(gpt2_dir), "--top", "3"])
    out = capsys.readouterr().out
    assert "vocab size: 50,257" in out
    assert "Python keywords missing from the vocab (6 of 35)" in out
    assert "first merges: [' t', ' a', 'he']" in out
    assert "sample: 1 texts, 580 characters, 260 tokens" in out and "(1.000x)" in out


def test_cli_compare_with_counts_tokens_like_the_reference(gpt2, gpt2_dir, small_stdlib_texts, tmp_path,
                                                          capsys):
    """--compare-with between two different tokenizers, both ways round: each count and the ratio (this
    tokenizer's tokens over the other's) from token counts of the `tokenizers` library."""
    code_dir = tmp_path / "code"
    code = train_new_from_iterator(gpt2, small_stdlib_texts[:40], vocab_size=1000, show_progress=False)
    code.save_pretrained(code_dir)
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(small_stdlib_texts[150:153]):
        (data / f"m{i}.py").write_text(text, encoding="utf-8")
    texts = [p.read_text(encoding="utf-8") for p in sorted(data.glob("*.py"))]  # as the command reads them
    count = {}
    for d in (code_dir, gpt2_dir):
        ref = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        count[d] = sum(len(ref.encode(t).ids) for t in texts)
    assert count[code_dir] < 0.9 * count[gpt2_dir]  # a code vocab is cheaper on code: the ratio is not 1
    for this, other in [(code_dir, gpt2_dir), (gpt2_dir, code_dir)]:
        main(["tokenizer-report", str(this), "--dataset", str(data), "--n", "3",
              "--compare-with", str(other)])
        out = capsys.readouterr().out
        expected = (f"tokens vs {other}: {count[this]:,} vs {count[other]:,} "
                    f"({count[this] / count[other]:.3f}x)")
        assert expected in out.splitlines()


def test_cli_tokenize_json_diffs_clean_against_the_reference(gpt2_dir, tmp_path, capsys, monkeypatch):
    """`tokenize --json`: one {"ids", "tokens", "offsets"} object per input, as the reference's Encoding."""
    ref = tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    texts = ["naïve café 🐍👩\u200d💻 e\u0301 日本語 Привет<|endoftext|>x\r\n", SNIPPET]

    def golden(text: str) -> dict:
        enc = ref.encode(text)
        return {"ids": enc.ids, "tokens": enc.tokens, "offsets": [list(o) for o in enc.offsets]}

    f = tmp_path / "in.txt"
    f.write_bytes(texts[0].encode())
    main(["tokenize", str(f), "--tokenizer", str(gpt2_dir), "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == golden(texts[0])
    shard = tmp_path / "data.jsonl"
    shard.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts), encoding="utf-8")
    main(["tokenize", "--dataset", str(shard), "--n", "2", "--tokenizer", str(gpt2_dir), "--json"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [golden(t) for t in texts]
