"""Tokenizer speed against the references, measured in the same run on the same corpus.

Encoding (GPT-2's vocab from tests/fixtures): MB/s of UTF-8 input for
  - minicodeparrot `Tokenizer.encode`, one process: cold (fresh word cache) and warm (second pass);
  - reference `tokenizers.Tokenizer.from_file(...).encode(text)` (one thread per call);
  - tiktoken's GPT-2 encoding, built from the same vocab (no download), `encode_ordinary`;
  - batches with 2 workers: our `encode_batch` (processes), the reference's `encode_batch` (threads),
    tiktoken's `encode_ordinary_batch(num_threads=2)`.
Every result is checked to give the reference's ids.
Training: `bpe_trainer.train_bpe` vs the reference `train_new_from_iterator` at vocab 32768 (merges
compared too).

    python scripts/bench_tokenizer.py [--mb 8] [--train-mb 8] [--skip-train] [--skip-encode]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import stdlib_texts  # noqa: E402

from minicodeparrot.tokenizer import GPT2_PATTERN, Tokenizer, bytes_to_unicode  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def corpus(mb: float) -> list[str]:
    texts, size = [], 0
    for t in stdlib_texts():
        if size >= mb * 1e6:
            break
        texts.append(t)
        size += len(t.encode("utf-8"))
    return texts


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def tiktoken_gpt2():
    import tiktoken

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((FIXTURES / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def bench_encode(texts: list[str]) -> None:
    from tokenizers import Tokenizer as RefTokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"encode: {len(texts)} stdlib files, {mb:.2f} MB")
    ref = RefTokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    expected, _ = timed(lambda: [ref.encode(t).ids for t in texts])  # warm the reference's cache
    _, t_ref = timed(lambda: [ref.encode(t).ids for t in texts])
    rows = [("reference tokenizers encode (1 thread)", t_ref, True)]

    ours = Tokenizer.from_pretrained(FIXTURES)
    ids, t_cold = timed(lambda: [ours.encode(t) for t in texts])
    rows.append(("minicodeparrot encode, cold cache", t_cold, ids == expected))
    ids, t_warm = timed(lambda: [ours.encode(t) for t in texts])
    rows.append(("minicodeparrot encode, warm cache", t_warm, ids == expected))
    try:
        enc = tiktoken_gpt2()
        ids, t = timed(lambda: [enc.encode_ordinary(t) for t in texts])
        rows.append(("tiktoken gpt2 encode_ordinary", t, ids == expected))
    except ImportError:
        enc = None
        print("  (tiktoken not installed: skipped)")

    _, t_refb = timed(lambda: ref.encode_batch(texts))
    batch = ref.encode_batch(texts)
    rows.append(("reference encode_batch (2 threads)", t_refb, [e.ids for e in batch] == expected))
    fresh = Tokenizer.from_pretrained(FIXTURES)
    ids, t = timed(lambda: fresh.encode_batch(texts, num_workers=2))
    rows.append(("minicodeparrot encode_batch (2 processes)", t, ids == expected))
    if enc is not None:
        ids, t = timed(lambda: enc.encode_ordinary_batch(texts, num_threads=2))
        rows.append(("tiktoken encode_ordinary_batch (2 threads)", t, ids == expected))

    print(f"  {'':45s} {'MB/s':>7s} {'vs ref encode':>14s}  same ids")
    for name, t, same in rows:
        print(f"  {name:45s} {mb / t:7.2f} {t_ref / t:13.2f}x  {same}")
    t_ours_batch = rows[-2 if enc else -1][1]
    print(f"  minicodeparrot encode_batch vs reference encode_batch: {t_refb / t_ours_batch:.2f}x")


def bench_train(texts: list[str]) -> None:
    try:
        from minicodeparrot.bpe_trainer import train_bpe
    except ImportError as e:
        print(f"train: skipped, minicodeparrot.bpe_trainer is not importable yet ({e})")
        return
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"train: vocab 32768 on {len(texts)} stdlib files, {mb:.2f} MB")
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
    ap.add_argument("--train-mb", type=float, default=8.0, help="MB of stdlib code for training")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-encode", action="store_true")
    args = ap.parse_args()
    if not args.skip_encode:
        bench_encode(corpus(args.mb))
    if not args.skip_train:
        bench_train(corpus(args.train_mb))


if __name__ == "__main__":
    main()
