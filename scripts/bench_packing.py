"""Packing and pretokenizing throughput on the stdlib corpus, against the book's reference approach.

    python scripts/bench_packing.py [--max-sequences 1500] [--num-of-sequences 256]

1. Packing tokens/s through a DataLoader with 1 and 2 workers: ours (`ConstantLengthDataset` +
   `Tokenizer` + `ShardStream`) vs. the book's ConstantLengthDataset loop driven by the reference
   `transformers` GPT-2 fast tokenizer (Rust), reading the same shards.
2. The dropped fraction with the default buffer over the whole stdlib train split.
3. `pretokenize` records/s with 1 and 2 worker processes, and `TokenShardDataset` read tokens/s.

Both use GPT-2's tokenizer (tests/fixtures). Needs the `dev` extra (transformers).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from minicodeparrot.data.packing import ConstantLengthDataset
from minicodeparrot.data.pretokenize import TokenShardDataset, pretokenize
from minicodeparrot.sources.corpus import make_corpus
from minicodeparrot.sources.shards import ShardStream
from minicodeparrot.tokenizer.bpe import Tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


class BookConstantLengthDataset(IterableDataset):
    """The book's loop (ch. 10) verbatim in spirit, with a `transformers` tokenizer."""

    def __init__(self, tokenizer, dataset, seq_length=1024, num_of_sequences=1024, chars_per_token=3.6):
        self.tokenizer, self.dataset, self.seq_length = tokenizer, dataset, seq_length
        self.concat_token_id = tokenizer.eos_token_id
        self.input_characters = seq_length * chars_per_token * num_of_sequences

    def __iter__(self):
        iterator = iter(self.dataset)
        more_examples = True
        while more_examples:
            buffer, buffer_len = [], 0
            while buffer_len < self.input_characters:
                try:
                    buffer.append(next(iterator)["content"])
                    buffer_len += len(buffer[-1])
                except StopIteration:
                    more_examples = False
                    break
            all_token_ids = []
            for ids in self.tokenizer(buffer, truncation=False)["input_ids"]:
                all_token_ids.extend(ids + [self.concat_token_id])
            for i in range(0, len(all_token_ids), self.seq_length):
                input_ids = all_token_ids[i:i + self.seq_length]
                if len(input_ids) == self.seq_length:
                    yield torch.tensor(input_ids)


def tokens_per_second(dataset, workers: int, max_sequences: int) -> float:
    loader = DataLoader(dataset, batch_size=8, num_workers=workers)
    start, n = time.perf_counter(), 0
    for batch in itertools.islice(loader, max_sequences // 8):
        n += batch.numel()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-sequences", type=int, default=1500, help="1024-token sequences per measurement")
    ap.add_argument("--num-of-sequences", type=int, default=256, help="packing buffer, in sequences")
    ap.add_argument("--pretokenize-records", type=int, default=300)
    args = ap.parse_args()
    # One Rust thread per worker, so that "per worker" means one core for both.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import GPT2TokenizerFast

    ours_tok = Tokenizer.from_pretrained(FIXTURES)
    ref_tok = GPT2TokenizerFast.from_pretrained(FIXTURES)
    ref_tok.model_max_length = 10**9  # silence the "longer than 1024" warning; packing cuts itself

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_corpus(Path(tmp) / "corpus", samples_per_file=200, show_progress=False)
        train = Path(tmp) / "corpus" / "train"
        print(f"corpus: {len(shards)} shards of the stdlib; seq_length 1024, buffer {args.num_of_sequences} "
              f"sequences, {args.max_sequences} sequences per measurement")
        print(f"{'workers':>7} {'ours tok/s':>12} {'ours/worker':>12} {'ref tok/s':>12} {'ref/worker':>12} "
              f"{'ours/ref':>9}")
        for workers in (1, 2):
            def stream():
                return ShardStream(train, shuffle_files=False)
            n_seq = args.num_of_sequences
            ours = tokens_per_second(ConstantLengthDataset(ours_tok, stream(), num_of_sequences=n_seq),
                                     workers, args.max_sequences)
            ref = tokens_per_second(BookConstantLengthDataset(ref_tok, stream(), num_of_sequences=n_seq),
                                    workers, args.max_sequences)
            print(f"{workers:>7} {ours:>12,.0f} {ours / workers:>12,.0f} {ref:>12,.0f} "
                  f"{ref / workers:>12,.0f} {ours / ref:>9.2f}")

        # Dropped fraction with the defaults (1024 x 1024 x 3.6) over the whole stdlib train split. Only
        # document lengths matter, so simulate the buffers from per-document (chars, tokens) counts.
        from minicodeparrot.sources.shards import iter_texts

        texts = list(iter_texts(train))
        encoded = ours_tok.encode_batch(texts, parse_special=False)
        sizes = [(len(t), len(ids) + 1) for t, ids in zip(texts, encoded, strict=True)]
        target, total, dropped, chars, tokens = 1024 * 3.6 * 1024, 0, 0, 0, 0
        for i, (c, n) in enumerate(sizes):
            chars, tokens = chars + c, tokens + n
            if chars >= target or i == len(sizes) - 1:
                total, dropped, chars, tokens = total + tokens, dropped + tokens % 1024, 0, 0
        print(f"defaults on the stdlib train split: {total:,} tokens, {dropped:,} dropped "
              f"({dropped / total:.3%}); {sum(c for c, _ in sizes) / (total - len(sizes)):.2f} chars/token")

        subset = Path(tmp) / "subset"
        lib = Path(os.__file__).parent
        make_corpus(subset, sources=[lib / "email", lib / "asyncio", lib / "json", lib / "unittest"],
                    samples_per_file=100, validation_fraction=0.0, show_progress=False)
        for workers in (1, 2):
            s = pretokenize(subset / "train", ours_tok, Path(tmp) / f"tok{workers}", num_workers=workers,
                            show_progress=False)
            print(f"pretokenize, {workers} worker(s): {s['records']} records, {s['tokens']:,} tokens in "
                  f"{s['seconds']:.1f} s = {s['records_per_s']:.0f} records/s, "
                  f"{s['tokens'] / s['seconds']:,.0f} tokens/s")
        windows = TokenShardDataset(Path(tmp) / "tok1", seq_length=1024, infinite=True)
        start = time.perf_counter()
        n = sum(w.numel() for w in itertools.islice(iter(windows), 20 * windows.num_windows))
        print(f"TokenShardDataset (memmap, main process): {n / (time.perf_counter() - start):,.0f} tokens/s")


if __name__ == "__main__":
    main()
