"""The fused loss's chunk size, measured: time and peak memory of one forward + backward of `lm_head_loss`.

    python scripts/bench_loss_chunk.py --calls 1         # CPU, codeparrot-small's head at 1 x 1024 tokens
    python scripts/bench_loss_chunk.py --device cuda     # batch 12 x 1024 under bf16 autocast (gpu_check too)

`model/gpt.py` cuts the [tokens, vocab] logits into chunks of LOSS_CHUNK_ELEMENTS // vocab rows. Small chunks
hold less memory but give each matmul fewer rows (a GPU wants thousands of rows per matmul to be busy); large
chunks hold more fp32 logits at once. Each size runs three times, interleaved with the others (a drift of the
machine then hits every size alike), and the median and spread are reported. Peak memory is the growth during
the call: `torch.cuda.max_memory_allocated` on a GPU, the CPU memory profiler's timeline on a CPU (the same
method as scripts/bench_model.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from minicodeparrot.model import gpt
from minicodeparrot.model.gpt import TokenEmbedding, lm_head_loss

# LOSS_CHUNK_ELEMENTS candidates: chunks of 64 ... 2048 tokens for a 32768-token vocabulary.
SIZES = [2**21, 2**22, 2**23, 2**24, 2**25, 2**26]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(h: torch.Tensor, wte: TokenEmbedding, labels: torch.Tensor, bf16: bool) -> None:
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = lm_head_loss(h, wte, labels)
    loss.backward()
    h.grad = wte.weight.grad = None


def _peak_growth_mib(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return (max(sum(s) for s in sizes) - sum(sizes[0])) / 2**20


def measure(device: torch.device, tokens: int, n_embd: int, vocab: int, bf16: bool, sizes: list[int],
            reps: int = 3, calls: int = 3) -> list[dict]:
    """One row per chunk size: chunk tokens, median / min / max ms per forward+backward, peak MiB."""
    torch.manual_seed(0)
    wte = TokenEmbedding(vocab, n_embd).to(device)
    h = torch.randn(1, tokens, n_embd, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    saved = gpt.LOSS_CHUNK_ELEMENTS
    times: dict[int, list[float]] = {s: [] for s in sizes}
    peaks: dict[int, float] = {}
    try:
        for size in sizes:  # warm-up, and the memory peak (its own pass: the profiler slows the timing)
            gpt.LOSS_CHUNK_ELEMENTS = size
            _step(h, wte, labels, bf16)
            peaks[size] = _peak_growth_mib(lambda: _step(h, wte, labels, bf16), device)
        for _ in range(reps):
            for size in sizes:
                gpt.LOSS_CHUNK_ELEMENTS = size
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    _step(h, wte, labels, bf16)
                _sync(device)
                times[size].append(1000 * (time.perf_counter() - t0) / calls)
    finally:
        gpt.LOSS_CHUNK_ELEMENTS = saved
    return [{"chunk_elements": s, "chunk_tokens": max(1, s // vocab),
             "ms_median": statistics.median(times[s]), "ms_min": min(times[s]), "ms_max": max(times[s]),
             "peak_mib": peaks[s]} for s in sizes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, help="tokens per call (default: 1024 on CPU, 12 x 1024 on GPU)")
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=3, help="forward+backward calls per timing (default 3)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    tokens = args.tokens or (12 * 1024 if device.type == "cuda" else 1024)
    rows = measure(device, tokens, args.n_embd, args.vocab, device.type == "cuda", SIZES, calls=args.calls)
    print(f"lm_head_loss forward+backward, {tokens} tokens x {args.n_embd}, vocab {args.vocab}, {device}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; median of 3 interleaved repeats")
    print("| LOSS_CHUNK_ELEMENTS | tokens per chunk | ms (median) | ms (min-max) | peak growth MiB |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| 2**{r['chunk_elements'].bit_length() - 1} | {r['chunk_tokens']} | {r['ms_median']:.1f} | "
              f"{r['ms_min']:.1f}-{r['ms_max']:.1f} | {r['peak_mib']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "tokens": tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
