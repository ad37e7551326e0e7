"""The book's look at a trained tokenizer: what did it learn, and is it better for code than GPT-2's?

Chapter 10 checks a new tokenizer in a few ways, all reproduced here: the longest tokens (long
whitespace runs and boilerplate strings betray what the training data repeats), the first and the
last merges (the first are the most frequent pairs, the last are rare), which Python keywords did
not become single tokens, the average number of characters per token (CodeParrot: about 3.6, used
to size packing buffers), and how many tokens the same code costs compared with GPT-2's tokenizer
(about half: a model then sees twice as much code per 1024-token window).
"""

from __future__ import annotations

import argparse
import json
import keyword
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from minicodeparrot.errors import UserError
from minicodeparrot.sources.shards import iter_texts
from minicodeparrot.tokenizer.bpe import Tokenizer

SNIPPET = 'def say_hello():\n    print("Hello, World!") # Print it\n\nsay_hello()\n'


@dataclass
class Report:
    vocab_size: int
    snippet_tokens: list[str]
    longest: list[str]
    first_merges: list[str]
    last_merges: list[str]
    missing_keywords: list[str]
    n_texts: int = 0
    n_chars: int = 0
    n_tokens: int = 0
    other_tokens: int | None = None
    other_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / self.n_tokens if self.n_tokens else float("nan")


def longest_tokens(tok: Tokenizer, k: int = 8) -> list[str]:
    """The k longest tokens as text (ties in id order). Special tokens are not learned, so left out."""
    specials = set(tok.special_tokens)
    ids = [i for t, i in tok.vocab.items() if t not in specials]
    ids.sort(key=lambda i: (-len(tok.decode([i])), i))
    return [tok.decode([i]) for i in ids[:k]]


def merged_tokens(tok: Tokenizer) -> list[str]:
    """The token each merge creates, in merge order, as text."""
    return [tok.decode([tok.vocab[a + b]]) for a, b in tok.merges]


def missing_keywords(tok: Tokenizer) -> list[str]:
    """Python keywords that are not one token (the book: only `nonlocal` for CodeParrot's 32768 vocab).

    Checked without a leading space, as in the book (`keyword not in tokenizer.vocab`).
    """
    return [kw for kw in keyword.kwlist if kw not in tok.vocab]


def sample_texts(spec: str | None, n: int) -> list[str]:
    """Up to n texts: .py files of a file/directory (the stdlib when spec is None), else a dataset.

    Dataset specs (codeparrot-format shards, `owner/name` Hub repos) go through `shards.iter_texts`.
    """
    if spec is None:
        import sysconfig

        return _read_py(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")), n)
    path = Path(spec)
    if path.is_file() and path.suffix == ".py":
        return _read_py([path], n)
    if path.is_dir():
        files = sorted(path.rglob("*.py"))
        has_data = any(p.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")) for p in path.rglob("*"))
        if files and not has_data:
            return _read_py(files, n)
    return list(iter_texts(spec, n=n))


def _read_py(files: list[Path], n: int) -> list[str]:
    texts, undecodable = [], 0
    for p in files:
        if len(texts) >= n:
            break
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            undecodable += 1
    if undecodable:
        print(f"tokenizer-report: skipped {undecodable} file(s) that are not UTF-8")
    if not texts:
        raise UserError("no .py text to sample; pass --dataset with .py files or dataset shards")
    return texts


def make_report(
    tok: Tokenizer, texts: Iterable[str] = (), other: Tokenizer | None = None, other_name: str = "GPT-2",
    k: int = 8,
) -> Report:
    merged = merged_tokens(tok)
    rep = Report(
        vocab_size=len(tok),
        snippet_tokens=tok.tokenize(SNIPPET),
        longest=longest_tokens(tok, k),
        first_merges=merged[:k],
        last_merges=merged[-k:],
        missing_keywords=missing_keywords(tok),
        other_name=other_name,
    )
    texts = list(texts)
    if texts:
        # parse_special=False: a sample that mentions "<|endoftext|>" is measured as the text it is.
        ids = tok.encode_batch(texts, parse_special=False)
        rep.n_texts, rep.n_chars, rep.n_tokens = len(texts), sum(map(len, texts)), sum(map(len, ids))
        if other is not None:
            rep.other_tokens = sum(map(len, other.encode_batch(texts, parse_special=False)))
    return rep


def format_report(rep: Report) -> str:
    lines = [
        f"vocab size: {rep.vocab_size:,}",
        f"tokens of the book's snippet: {rep.snippet_tokens}",
        f"longest tokens: {rep.longest}",
        f"first merges: {rep.first_merges}",
        f"last merges: {rep.last_merges}",
        f"Python keywords missing from the vocab ({len(rep.missing_keywords)} of {len(keyword.kwlist)}): "
        f"{rep.missing_keywords}",
    ]
    if rep.n_tokens:
        lines.append(f"sample: {rep.n_texts:,} texts, {rep.n_chars:,} characters, {rep.n_tokens:,} tokens")
        lines.append(f"characters per token: {rep.chars_per_token:.4f}")
        if rep.other_tokens is not None:
            lines.append(
                f"tokens vs {rep.other_name}: {rep.n_tokens:,} vs {rep.other_tokens:,} "
                f"({rep.n_tokens / rep.other_tokens:.3f}x)"
            )
    return "\n".join(lines + rep.notes)


# --- the tokenize and tokenizer-report commands ---------------------------------------------------
def tokenize_command(args: argparse.Namespace) -> None:
    """`minicodeparrot tokenize`: tokens, ids or JSON of a file, stdin or dataset records."""
    tok = Tokenizer.from_pretrained(args.tokenizer)
    if args.dataset is not None:
        _tokenize_dataset(tok, args)
        return
    if args.file in (None, "-"):
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8", newline="") as f:  # keep \r\n: it is tokenized too
                text = f.read()
        except FileNotFoundError:
            raise UserError(f"{args.file} does not exist; pass a text file or '-' for stdin") from None
        except UnicodeDecodeError:
            raise UserError(f"{args.file} is not UTF-8 text; convert it first") from None
    _print_tokens(tok, text, args)


def _print_tokens(tok, text: str, args: argparse.Namespace) -> None:
    if args.json:
        ids, offsets = tok.encode_with_offsets(text, parse_special=not args.no_special)
        record = {"ids": ids, "tokens": tok.convert_ids_to_tokens(ids), "offsets": [list(o) for o in offsets]}
        print(json.dumps(record, ensure_ascii=False))
        return
    ids = tok.encode(text, parse_special=not args.no_special)
    print(ids if args.ids else tok.convert_ids_to_tokens(ids))


def _tokenize_dataset(tok, args: argparse.Namespace) -> None:
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    count = 0
    for text in iter_texts(args.dataset, n=args.n, text_field=args.text_field):
        _print_tokens(tok, text, args)
        count += 1
    if count == 0:
        raise UserError(f"no records with a {args.text_field!r} field in {args.dataset}; check --text-field")
    if count < args.n:
        print(f"tokenize: {args.dataset} has only {count} records (asked for --n {args.n})", file=sys.stderr)


def tokenizer_report_command(args: argparse.Namespace) -> None:
    """`minicodeparrot tokenizer-report`: the book's analysis of a tokenizer, printed."""
    if args.n < 1 or args.top < 1:
        raise UserError("--n and --top must be at least 1")
    tok = Tokenizer.from_pretrained(args.tokenizer)
    other = Tokenizer.from_pretrained(args.compare_with) if args.compare_with else None
    texts = sample_texts(args.dataset, args.n)
    print(format_report(make_report(tok, texts, other, other_name=args.compare_with or "", k=args.top)))
