"""Training throughput of minicodeparrot's GPT vs transformers.GPT2LMHeadModel, driven by the same loop.

    python scripts/bench_train.py --device cuda --out bench_train.json   # codeparrot-small, seq 1024, bf16
    python scripts/bench_train.py --device cpu --out bench_train_cpu.json  # tiny config: a quick sanity ratio

Each configuration runs the training loop's own step (`train.accumulate_gradients`, clipping to 1.0, fused
AdamW on GPU) on random tokens, so the numbers measure model + optimizer, not data loading. Reported per
configuration: tokens/s, MFU (the model's FLOPs per token x tokens/s / the device's bf16 peak; GPU only) and
peak memory. On CUDA it also searches the largest gpt2-xl (codeparrot 1.5B) micro-batch that fits with
activation checkpointing. Results go to --out as JSON and a table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch
from torch import nn

from minicodeparrot.model.gpt import GPT, GPTConfig
from minicodeparrot.training.train import accumulate_gradients, make_optimizer, peak_flops


class HFAdapter(nn.Module):
    """transformers' GPT2LMHeadModel behind our model's forward signature: (logits, loss)."""

    def __init__(self, config: GPTConfig, gradient_checkpointing: bool):
        super().__init__()
        import transformers

        hf_cfg = transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0)
        self.hf = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa")
        if gradient_checkpointing:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids, labels=None):
        # use_cache=False: training never reuses keys and values; building the cache costs time.
        out = self.hf(input_ids=input_ids, labels=labels, use_cache=False)
        return out.logits, out.loss


def run_config(name: str, impl: str, config: GPTConfig, batch: int, seq: int, device: torch.device,
               bf16: bool, compile: bool, ckpt: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    with device:  # initialise on the device: a CPU init of gpt2-xl's 1.5B weights takes seconds per probe
        if impl == "ours":
            model = GPT(config)
            model.gradient_checkpointing = ckpt
        else:
            model = HFAdapter(config, ckpt)
    model.to(device).train()  # a no-op unless a library ignored the device context
    with torch.device("meta"):  # same architecture, one formula for both implementations
        flops_per_token = GPT(config).estimate_flops_per_token(seq)
    step_model = torch.compile(model) if compile else model
    opt = make_optimizer(model, 1e-4, 0.1, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    data = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        accumulate_gradients(step_model, [data], autocast, scaler)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    tokens_per_s = batch * seq * steps / dt
    peak = peak_flops(device)
    row = {"name": name, "impl": impl, "batch": batch, "seq": seq, "bf16": bf16, "compile": compile,
           "gradient_checkpointing": ckpt, "tokens_per_s": tokens_per_s, "step_ms": 1000 * dt / steps,
           "flops_per_token": flops_per_token,
           "mfu": flops_per_token * tokens_per_s / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(config: GPTConfig, seq: int, device: torch.device, steps: int) -> dict:
    """Doubling search for the largest gpt2-xl micro-batch that trains with checkpointing + bf16."""
    best, batch = None, 1
    while batch <= 256:
        try:
            best = run_config(f"gpt2-xl ckpt b{batch}", "ours", config, batch, seq, device, True, False, True,
                              steps, 1)
        except torch.OutOfMemoryError:
            _free(device)
            break
        _free(device)
        print(f"  gpt2-xl micro-batch {batch}: {best['tokens_per_s']:,.0f} tok/s, "
              f"{best['peak_mem_gib']:.1f} GiB", flush=True)
        batch *= 2
    return best or {"batch": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_train.json")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 12 on GPU, as the book)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds over all configurations, best kept (default 1 on GPU, 3 on CPU)")
    ap.add_argument("--skip-xl", action="store_true", help="skip the gpt2-xl micro-batch search")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        config, seq, batch = GPTConfig.from_preset("gpt2", vocab_size=32768), 1024, args.batch or 12
        steps, warmup = args.steps or 20, 3
        plans = [("ours eager", "ours", False, False), ("ours compile", "ours", True, False),
                 ("ours eager + ckpt", "ours", False, True), ("ours compile + ckpt", "ours", True, True),
                 ("transformers eager", "hf", False, False), ("transformers compile", "hf", True, False),
                 ("transformers eager + ckpt", "hf", False, True)]
        bf16 = True
    else:
        config = GPTConfig(vocab_size=8000, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        seq, batch, steps, warmup = 128, args.batch or 8, args.steps or 10, 2
        plans = [("ours eager", "ours", False, False), ("transformers eager", "hf", False, False)]
        bf16 = False

    repeats = args.repeats or (1 if device.type == "cuda" else 3)
    by_name: dict[str, dict] = {}
    for _ in range(repeats):  # interleaved rounds: load changes on a shared machine hit both sides alike
        for name, impl, compile, ckpt in plans:
            try:
                row = run_config(name, impl, config, batch, seq, device, bf16, compile, ckpt, steps,
                                 warmup + (2 if compile else 0))
            except Exception as e:  # noqa: BLE001 -- a failing variant (e.g. compile) must not lose the rest
                print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                _free(device)
                continue
            _free(device)
            mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] else ""
            mem = f", {row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] else ""
            print(f"{name:28s} {row['tokens_per_s']:>12,.0f} tok/s{mfu}{mem}", flush=True)
            if name not in by_name or row["tokens_per_s"] > by_name[name]["tokens_per_s"]:
                by_name[name] = row
    rows = list(by_name.values())
    ratios = {}
    for ours, ref in [("ours eager", "transformers eager"), ("ours compile", "transformers eager"),
                      ("ours compile", "transformers compile"),
                      ("ours eager + ckpt", "transformers eager + ckpt")]:
        if ours in by_name and ref in by_name:
            ratios[f"{ours} / {ref}"] = by_name[ours]["tokens_per_s"] / by_name[ref]["tokens_per_s"]
            print(f"ratio {ours} / {ref}: {ratios[f'{ours} / {ref}']:.2f}x")
    xl = None
    if device.type == "cuda" and not args.skip_xl:
        xl = largest_batch(GPTConfig.from_preset("gpt2-xl", vocab_size=32768, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 resid_pdrop=0.0), 1024, device, steps=3)
        print(f"largest gpt2-xl micro-batch with checkpointing: {xl['batch']}")
    import transformers

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "batch": batch, "seq": seq, "steps": steps}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "ratios": ratios, "gpt2_xl_largest_batch": xl}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
