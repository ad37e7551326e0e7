"""Does the training input keep up with a GPU? Drive the loop's own input with a simulated GPU.

    python scripts/bench_input.py --dataset DIR --tokenizer DIR --seq-length 1024 --batch-size 12 \\
        --consumer-tokens-per-s 500000 --steps 400 --data-workers 2

builds the same loader the training loop uses (`streams.build_train_loader`, the preset's shuffle
buffers by default) and consumes it like a GPU that needs `--consumer-tokens-per-s` tokens per second:
after each batch it stages the next one, as the loop does before its sync (`Loader.stage`), then sleeps
until that step would end. A wait is the time the simulated GPU has no batch: getting the staged batch,
plus staging beyond the step's end. It reports the share of wall time spent waiting for data, the
longest single wait, both after `--warmup-steps` (the first batch waits for the shuffle buffers to fill),
the consumer's own CPU time per batch (receiving, converting, the state mirror), then the size of the
loader's checkpoint state. The last line is

    data wait: P% of wall time, max wait M ms after warm-up (N workers, T tokens/s delivered)

`--max-rate` instead consumes as fast as it can with 1, 2 and 4 workers (or --data-workers N) and prints
the highest rate one rank's pipeline sustains, and per worker.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minicodeparrot.data.streams import build_train_loader, new_layout  # noqa: E402
from minicodeparrot.tokenizer.bpe import Tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="training shards (e.g. make-corpus OUTPUT/train)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer directory (vocab.json + merges.txt, or tokenizer.json)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--consumer-tokens-per-s", type=float, default=500_000,
                   help="tokens per second the simulated GPU consumes (500k: one H100, codeparrot-small)")
    p.add_argument("--steps", type=int, default=400, help="batches measured after the warm-up")
    p.add_argument("--warmup-steps", type=int, default=20, help="batches not measured (buffers filling)")
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--record-shuffle-buffer", type=int, default=10_000)
    p.add_argument("--sequence-shuffle-buffer", type=int, default=10_000)
    p.add_argument("--tokenized", action="store_true", help="--dataset holds pretokenized shards")
    p.add_argument("--no-stage", action="store_true",
                   help="receive each batch after the simulated GPU step instead of during it (the loop "
                        "before `Loader.stage`)")
    p.add_argument("--max-rate", action="store_true",
                   help="no simulated GPU: the highest rate with 1, 2 and 4 workers (or --data-workers)")
    return p.parse_args(argv)


def state_megabytes(loader) -> float:
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    return buf.tell() / 1e6


def run(args: argparse.Namespace, tokenizer: Tokenizer, workers: int, tokens_per_s: float | None) -> dict:
    """Consume warm-up + measured steps; waits and wall time are measured after the warm-up only."""
    step_s = args.batch_size * args.seq_length / tokens_per_s if tokens_per_s else 0.0
    # One rank whose step is one batch: the training loop's default of one stream per sequence.
    layout = new_layout(args.batch_size, 1, None, args.record_shuffle_buffer, args.sequence_shuffle_buffer)
    loader = build_train_loader(args.dataset, tokenizer, layout, seq_length=args.seq_length, seed=1,
                                micro_batch=args.batch_size, tokenized=args.tokenized, num_workers=workers,
                                prefetch=args.prefetch)
    waits, cpu, tokens = [], [], 0
    with loader:
        t_start = time.perf_counter()
        for _ in range(args.warmup_steps):
            next(loader)
        warmup_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        for _ in range(args.steps):
            t, c = time.perf_counter(), time.thread_time()
            batch = next(loader)  # staged during the previous step, unless --no-stage
            gpu_done = time.perf_counter() + step_s  # the simulated GPU starts on this batch now
            wait = gpu_done - step_s - t
            if not args.no_stage:
                loader.stage(1)  # as the training loop does before its one sync: during the GPU step
                wait += max(0.0, time.perf_counter() - gpu_done)  # only the part the GPU waits for
            # CPU time is what receiving costs the consumer itself; the wait also holds time spent blocked
            # on a worker and time the consumer's vCPU was busy with someone else (a shared 2-core box).
            cpu.append(time.thread_time() - c)
            waits.append(wait)
            tokens += batch.numel()
            if step_s:
                time.sleep(max(0.0, gpu_done - time.perf_counter()))  # the sync: the workers keep producing
        wall = time.perf_counter() - t0
        state_mb = state_megabytes(loader)
    return {"workers": workers, "wait_share": sum(waits) / wall, "max_wait_ms": 1000 * max(waits),
            "median_wait_ms": 1000 * sorted(waits)[len(waits) // 2],
            "cpu_mean_ms": 1000 * sum(cpu) / len(cpu), "cpu_median_ms": 1000 * sorted(cpu)[len(cpu) // 2],
            "tokens_per_s": tokens / wall, "warmup_s": warmup_s, "state_mb": state_mb}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"batch {args.batch_size} x {args.seq_length}, buffers {args.record_shuffle_buffer} records / "
          f"{args.sequence_shuffle_buffer} sequences per rank", flush=True)
    if args.max_rate:
        counts = [args.data_workers] if "--data-workers" in (argv or sys.argv) else [1, 2, 4]
        for n in counts:
            r = run(args, tokenizer, n, None)
            print(f"max rate: {r['tokens_per_s']:,.0f} tokens/s with {n} workers "
                  f"({r['tokens_per_s'] / max(1, n):,.0f} per worker; warm-up {r['warmup_s']:.1f} s; "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)
        return
    r = run(args, tokenizer, args.data_workers, args.consumer_tokens_per_s)
    print(f"warm-up: {args.warmup_steps} batches in {r['warmup_s']:.1f} s; load average "
          f"{os.getloadavg()[0]:.1f}; median wait {r['median_wait_ms']:.2f} ms; data state "
          f"{r['state_mb']:.2f} MB per rank (torch.save)")
    print(f"consumer CPU per batch received: mean {r['cpu_mean_ms']:.3f} ms, median "
          f"{r['cpu_median_ms']:.3f} ms")
    print(f"data wait: {100 * r['wait_share']:.1f}% of wall time, max wait {r['max_wait_ms']:.0f} ms after "
          f"warm-up ({r['workers']} workers, {r['tokens_per_s']:,.0f} tokens/s delivered)")


if __name__ == "__main__":
    main()
