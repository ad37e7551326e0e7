"""Tokenizer speed against the references, measured in the same run on the same texts.

Encoding (GPT-2's vocab from tests/fixtures), MB/s of UTF-8 input, one process, one call per document:
  - reference `tokenizers.Tokenizer.from_file(...).encode(text)`: cold (fresh tokenizer) and warm (second
    pass, its word cache filled); the ratio is taken against the faster of the two;
  - minicodeparrot `Tokenizer.encode`, cold: a fresh tokenizer, empty word cache;
  - tiktoken's GPT-2 encoding built from the same vocab, `encode_ordinary` (code only; for scale);
  - batches with 2 workers on code: our `encode_batch` (processes) and the reference's (threads).
Corpora: standard-library code, and generated prose in Spanish, Russian and Chinese (`prose`: words
drawn with Zipf's law from a generated vocabulary, so that the cache hit rate is like a real text's).
Every result is checked to give the reference's ids. Each row is the best of --rounds interleaved rounds;
one-thread rows are timed in CPU seconds of the process (steady on a shared machine), batch rows in wall time.
Training: `bpe_trainer.train_bpe` vs the reference `train_new_from_iterator` at vocab 32768 on code from
the standard library and site-packages (merges compared too).

    python scripts/bench_tokenizer.py [--mb 8] [--prose-mb 2] [--train-mb 50] [--skip-train] [--skip-encode]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import stdlib_texts  # noqa: E402

from minicodeparrot.tokenizer.bpe import GPT2_PATTERN, Tokenizer, bytes_to_unicode  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def corpus(mb: float) -> list[str]:
    texts, size = [], 0
    for t in stdlib_texts():
        if size >= mb * 1e6:
            break
        texts.append(t)
        size += len(t.encode("utf-8"))
    return texts


def code_corpus(mb: float) -> list[str]:
    """The standard library's .py files, then site-packages' (torch, transformers, ...), up to `mb` MB."""
    texts, size = [], 0
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    seen = set()
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if size >= mb * 1e6:
                return texts
            if p in seen or not 1024 <= p.stat().st_size <= 1 << 20:
                continue
            seen.add(p)
            try:
                texts.append(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
            size += len(texts[-1].encode("utf-8"))
    print(f"  (only {size / 1e6:.1f} MB of code found)")
    return texts


# --- generated prose -------------------------------------------------------------------------
def _vocabulary(rng: random.Random, syllables: list[str], n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choices(syllables, k=rng.choice([1, 2, 2, 3, 3, 3, 4, 5]))))
    out = sorted(words)
    rng.shuffle(out)
    return out


def _zipf(rng: random.Random, items: list[str]):
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(items))))
    return lambda k: rng.choices(items, cum_weights=cum, k=k)


def prose(lang: str, mb: float, seed: int = 0) -> list[str]:
    """Documents of ~4 kB in `lang` (es, ru, zh) until `mb` MB: sentences of Zipf-distributed words.

    es: syllables of Spanish letters, one vowel in ~12 accented, some ñ, ¿?¡!; ru: Cyrillic syllables;
    zh: 4,000 CJK ideographs drawn by Zipf's law, clauses of 4-18 characters, Chinese punctuation.
    Numbers and line breaks are sprinkled in. 30,000 word types per language.
    """
    rng = random.Random(seed)
    if lang == "zh":
        han = [chr(c) for c in range(0x4E00, 0x9FA6)]
        rng.shuffle(han)
        words = _zipf(rng, han[:4000])
    else:
        if lang == "es":
            vowels = list("aeiou") * 12 + list("áéíóú")
            onsets = "b c d f g h j l m n p qu r rr s t v z ll ch ñ br tr pl".split()
        else:
            vowels = list("аеиоуыяю") * 3 + ["ё", "э"]
            onsets = list("бвгджзклмнпрстфхцчшщ") + ["ст", "пр", "тр", "кр"]
        syllables = [o + v for o in onsets for v in vowels] + vowels + [v + "н" if lang == "ru" else v + "n"
                                                                        for v in vowels[:5]]
        words = _zipf(rng, _vocabulary(rng, syllables, 30_000))
    docs, size = [], 0
    while size < mb * 1e6:
        parts = []
        while sum(map(len, parts)) < (1300 if lang == "zh" else 4000):
            if lang == "zh":
                clause = "".join(words(rng.randint(4, 18)))
                if rng.random() < 0.05:
                    clause += f"{rng.randint(1, 2030)}年"
                parts.append(clause + rng.choice("，，，。。、；：？！"))
            else:
                sentence = words(rng.randint(4, 20))
                sentence[0] = sentence[0].capitalize()
                text = " ".join(sentence)
                if rng.random() < 0.1:
                    text += f" {rng.randint(1, 9999)}"
                if lang == "es" and rng.random() < 0.1:
                    text = rng.choice(["¿" + text + "?", "¡" + text + "!"])
                else:
                    text += rng.choice([".", ".", ",", ";", ":"] if lang == "es" else [".", ".", ",", "—"])
                parts.append(text + " ")
            if rng.random() < 0.04:
                parts.append("\n\n")
        docs.append("".join(parts))
        size += len(docs[-1].encode("utf-8"))
    return docs


# --- measuring -------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_timed(fn):
    """CPU seconds of this process: on a shared machine they move far less than wall time. Only for
    work done in this process on one thread (the reference's `encode` of one text is single-threaded)."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def tiktoken_gpt2():
    import tiktoken

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((FIXTURES / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def bench_encode(name: str, texts: list[str], rounds: int, extras: bool) -> None:
    from tokenizers import Tokenizer as RefTokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"encode: {name}, {len(texts)} documents, {mb:.2f} MB")
    best: dict[str, float] = {}
    expected = None
    enc = tiktoken_gpt2() if extras else None
    for _ in range(rounds):
        ref = RefTokenizer.from_file(str(FIXTURES / "tokenizer.json"))
        ids, t = cpu_timed(lambda: [ref.encode(t).ids for t in texts])  # noqa: B023
        expected = expected or ids
        rows = {"reference encode, cold": (t, ids)}
        rows["reference encode, warm"] = cpu_timed(lambda: [ref.encode(t).ids for t in texts])[::-1]  # noqa: B023
        ours = Tokenizer.from_pretrained(FIXTURES)
        rows["minicodeparrot encode, cold cache"] = cpu_timed(lambda: [ours.encode(t) for t in texts])[::-1]  # noqa: B023
        if extras:
            rows["tiktoken encode_ordinary"] = cpu_timed(
                lambda: [enc.encode_ordinary(t) for t in texts])[::-1]  # noqa: B023
            batch, t = timed(lambda: ref.encode_batch(texts))  # noqa: B023
            rows["reference encode_batch (2 threads), wall"] = (t, [e.ids for e in batch])
            fresh = Tokenizer.from_pretrained(FIXTURES)
            rows["minicodeparrot encode_batch (2 processes), wall"] = timed(
                lambda: fresh.encode_batch(texts, num_workers=2))[::-1]  # noqa: B023
        for row, (t, ids) in rows.items():
            assert ids == expected, f"{row} gives other ids than the reference"
            best[row] = min(best.get(row, t), t)
    t_ref = min(best["reference encode, cold"], best["reference encode, warm"])
    print(f"  {'':45s} {'MB/s':>7s} {'vs best reference encode':>25s}")
    for row, t in best.items():
        print(f"  {row:45s} {mb / t:7.2f} {t_ref / t:24.2f}x")


def bench_train(texts: list[str]) -> None:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from minicodeparrot.tokenizer.trainer import train_bpe

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"train: vocab 32768 on {len(texts)} .py files, {mb:.2f} MB")
    base = PreTrainedTokenizerFast(tokenizer_file=str(FIXTURES / "tokenizer.json"))
    alphabet = ByteLevel.alphabet()
    ref, t_ref = timed(lambda: base.train_new_from_iterator(texts, 32768, initial_alphabet=alphabet))
    ours, t_ours = timed(lambda: train_bpe(texts, 32768, initial_alphabet=alphabet, show_progress=False))
    ref_json = json.loads(ref.backend_tokenizer.to_str())["model"]
    ref_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in ref_json["merges"]]
    same = ours.merges == ref_merges and ours.vocab == ref.get_vocab()
    print(f"  reference train_new_from_iterator: {t_ref:6.2f} s")
    print(f"  minicodeparrot train_bpe:          {t_ours:6.2f} s   ({t_ours / t_ref:.2f}x reference time)")
    print(f"  same vocab and merges: {same} ({len(ours.merges)} merges)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of stdlib code for the encode benchmark")
    ap.add_argument("--prose-mb", type=float, default=2.0, help="MB of prose per language")
    ap.add_argument("--train-mb", type=float, default=50.0, help="MB of code for training")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per encode row (best is kept)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-encode", action="store_true")
    args = ap.parse_args()
    if not args.skip_encode:
        bench_encode("standard-library code", corpus(args.mb), args.rounds, extras=True)
        for lang, name in (("es", "Spanish"), ("ru", "Russian"), ("zh", "Chinese")):
            bench_encode(f"{name} prose (generated)", prose(lang, args.prose_mb), args.rounds, extras=False)
    if not args.skip_train:
        bench_train(code_corpus(args.train_mb))


if __name__ == "__main__":
    main()
