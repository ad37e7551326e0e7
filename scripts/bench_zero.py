"""Per-rank memory of model + gradients + AdamW state, with and without --zero (ZeRO-1), measured.

Runs `world` gloo processes on the CPU, builds the architecture, takes one optimizer step and counts the
bytes of every tensor each rank holds: parameters, gradients, optimizer state. Prints a table and the
ratio against plain DDP in the same run. The measurement is exact for any size that fits in memory; the
last rows extrapolate it to gpt2-xl (codeparrot, 1.5B) at 8 and 16 ranks with the per-parameter
bytes this run measured (the 24 GiB CI machine cannot hold two gpt2-xl ranks).

    python scripts/bench_zero.py --arch gpt2 --world 2
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minicodeparrot.model.gpt import GPT, GPTConfig
from minicodeparrot.training.train import make_optimizer


def _state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optim", optimizer)
    return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
               if torch.is_tensor(t))


def _worker(rank: int, world: int, port: int, arch: str, zero: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = GPT(GPTConfig.from_preset(arch, vocab_size=32768))
    opt = make_optimizer(model, 1e-4, 0.1, zero=zero)
    x = torch.randint(0, 32768, (1, 8))
    model(x, labels=x)[1].backward()
    opt.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    out[(zero, rank)] = (params, grads, _state_bytes(opt), sum(p.numel() for p in model.parameters()))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="gpt2")
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    out = mp.Manager().dict()
    for zero in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.world, port, args.arch, zero, out), nprocs=args.world, join=True)
    gib = 2**30
    print(f"{args.arch}, vocab 32768, {args.world} gloo ranks (GiB per rank: weights + grads + AdamW state)")
    print("| mode | rank | weights | grads | AdamW state | total |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = {}
    for zero in (False, True):
        for rank in range(args.world):
            p, g, s, n = out[(zero, rank)]
            totals.setdefault(zero, []).append(p + g + s)
            mode = "--zero" if zero else "DDP"
            cells = " | ".join(f"{b / gib:.3f}" for b in (p, g, s, p + g + s))
            print(f"| {mode} | {rank} | {cells} |")
    ratio = max(totals[True]) / max(totals[False])
    print(f"largest rank with --zero / without: {ratio:.3f}")
    n = out[(False, 0)][3]
    state_per_param = out[(False, 0)][2] / n  # AdamW: exp_avg + exp_avg_sq, fp32
    xl = sum(p.numel() for p in GPT(GPTConfig.from_preset("gpt2-xl", vocab_size=32768)).parameters())
    for world in (8, 16):
        plain = xl * (4 + 4 + state_per_param)
        sharded = xl * (4 + 4 + state_per_param / world)
        print(f"gpt2-xl ({xl / 1e9:.2f}B parameters), {world} ranks: DDP {plain / gib:.1f} GiB per rank, "
              f"--zero {sharded / gib:.1f} GiB per rank (extrapolated, {state_per_param:.1f} B of state "
              "per parameter)")


if __name__ == "__main__":
    main()
