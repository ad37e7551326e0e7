"""Derive the code points whose \\p{L} / \\p{N} class differs between `regex` and the reference.

The reference tokenizer (Hugging Face `tokenizers`) runs the GPT-2 pattern through Oniguruma,
whose tables are Unicode 16.0; the `regex` module here has Unicode 17.0 tables. For every code
point we ask both engines the same questions by pre-tokenizing small probe strings:

    "a" + c       one piece  <=>  c is a letter   (` ?\\p{L}+` swallows both)
    "1" + c       one piece  <=>  c is a number   (` ?\\p{N}+`)
    "!" + c + "!" one piece  <=>  c is neither letter, number nor whitespace

and print the code points that `regex` calls L/N but the reference does not, as compact ranges
ready to paste into minicodeparrot/tokenizer.py (`_NEW_IN_UNICODE_17`). It also checks the
converse (must be empty) and that `\\s` agrees on every code point.

    python scripts/make_unicode_tables.py
"""

from __future__ import annotations

import regex
from tokenizers import pre_tokenizers

REF = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def ref_pieces(s: str) -> int:
    return len(REF.pre_tokenize_str(s))


def ranges(cps: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in cps:
        if out and out[-1][1] == c - 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


def main() -> None:
    is_l = regex.compile(r"\p{L}").fullmatch
    is_n = regex.compile(r"\p{N}").fullmatch
    is_s = regex.compile(r"\s").fullmatch
    extra, missing, space_diff = [], [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be in a Rust string (nor in UTF-8 text)
            continue
        c = chr(cp)
        ref_l = ref_pieces("a" + c) == 1
        ref_n = ref_pieces("1" + c) == 1
        ref_other = ref_pieces("!" + c + "!") == 1
        ref_s = not (ref_l or ref_n or ref_other)
        rx_l, rx_n, rx_s = bool(is_l(c)), bool(is_n(c)), bool(is_s(c))
        if (rx_l and not ref_l) or (rx_n and not ref_n):
            extra.append(cp)
        if (ref_l and not rx_l) or (ref_n and not rx_n):
            missing.append(cp)
        if rx_s != ref_s:
            space_diff.append(cp)
    rs = ranges(extra)
    print(f"# {len(extra)} code points in {len(rs)} ranges: \\p{{L}}|\\p{{N}} in regex, not in the reference")
    print("_NEW_IN_UNICODE_17 = (")
    line = "   "
    for a, b in rs:
        item = f" (0x{a:04X}, 0x{b:04X}),"
        if len(line) + len(item) > 104:
            print(line)
            line = "   "
        line += item
    print(line)
    print(")")
    print(f"# reference L/N but not regex: {len(missing)} {[hex(c) for c in missing[:20]]}")
    print(f"# \\s disagreements: {len(space_diff)} {[hex(c) for c in space_diff[:20]]}")


if __name__ == "__main__":
    main()
