"""Write minicodeparrot/tokenizer/unicode_tables.py: the code points the reference calls letter, number,
space.

GPT-2's pattern is written with `\\p{L}`, `\\p{N}` and `\\s`. What those mean depends on the engine
and on its Unicode tables: the reference (Hugging Face `tokenizers`) runs the pattern through
Oniguruma with the tables it was built with, while each `regex` release ships the newest Unicode.
Rather than chase a moving target, we ask the reference itself, for every code point c, which
class it puts c in, by pre-tokenizing three probe strings:

    "\\na" + c   "a" and c are one piece  <=>  c is a letter   (` ?\\p{L}+` swallows both)
    "\\n1" + c   one piece                <=>  c is a number   (` ?\\p{N}+`)
    "\\n!" + c   one piece                <=>  c is neither letter, number nor space
    none of the three                    <=>  c is a space    (the classes partition all code points)

All probes of a kind are joined into one string and pre-tokenized at once; the piece offsets say
which probe characters share a piece. The result is written as sorted (first, last) ranges.

    python scripts/make_unicode_tables.py      # then: ruff check, pytest tests/tokenizer/test_bpe.py
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import pre_tokenizers

OUT = Path(__file__).resolve().parent.parent / "minicodeparrot" / "tokenizer/unicode_tables.py"
REF = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# Surrogates cannot be in a Rust string, nor in UTF-8 text: they are never tokenized.
CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]


def joins(probe: str) -> set[int]:
    """Code points c for which `probe` + c is a single piece of the reference's pre-tokenizer."""
    text = "".join(f"\n{probe}{chr(cp)}" for cp in CODE_POINTS)
    starts = {start for _, (start, _) in REF.pre_tokenize_str(text)}
    # Probe i occupies characters 3i .. 3i+2: "\n", the probe character, c.
    return {cp for i, cp in enumerate(CODE_POINTS) if 3 * i + 2 not in starts}


def ranges(cps: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


def table(name: str, rs: list[tuple[int, int]]) -> str:
    lines, line = [f"{name} = ("], "   "
    for a, b in rs:
        item = f" (0x{a:X}, 0x{b:X}),"
        if len(line) + len(item) > 110:
            lines.append(line)
            line = "   "
        line += item
    lines += [line, ")"]
    return "\n".join(lines)


def main() -> None:
    letters, numbers, other = joins("a"), joins("1"), joins("!")
    assert not (letters & numbers or letters & other or numbers & other), "a code point in two classes"
    spaces = set(CODE_POINTS) - letters - numbers - other
    body = [
        '"""What the reference pre-tokenizer calls a letter, a number and a space: generated, do not edit.',
        "",
        f"Written by scripts/make_unicode_tables.py from Hugging Face `tokenizers` {tokenizers.__version__}",
        "by asking its GPT-2 pre-tokenizer about every code point (see that script). Each table is",
        "sorted (first, last) inclusive code-point ranges. Code points in none of the three are the",
        "pattern's `[^\\\\s\\\\p{L}\\\\p{N}]` (punctuation, symbols, marks, unassigned ...).",
        '"""',
        "",
        f'REFERENCE = "tokenizers {tokenizers.__version__}"',
        "",
        f"# \\p{{L}}: {len(letters):,} code points",
        table("LETTERS", ranges(letters)),
        "",
        f"# \\p{{N}}: {len(numbers):,} code points",
        table("NUMBERS", ranges(numbers)),
        "",
        f"# \\s: {len(spaces):,} code points",
        table("SPACES", ranges(spaces)),
        "",
    ]
    OUT.write_text("\n".join(body), encoding="utf-8")
    print(f"wrote {OUT}: {len(letters)} letters, {len(numbers)} numbers, {len(spaces)} spaces "
          f"(tokenizers {tokenizers.__version__})")


if __name__ == "__main__":
    main()
