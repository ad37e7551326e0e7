"""Benchmark our GPT-2 against transformers.GPT2LMHeadModel in the same process.

Measures (1) forward+backward training tokens/s, (2) activation memory with and without activation
checkpointing, (3) the peak memory growth of one forward+backward (what the fused loss saves), (4) greedy
generation tokens/s (KV cache) against the reference's `generate`.

    python scripts/bench_model.py                        # CPU: a small config, a few steps
    python scripts/bench_model.py --device cuda --out bench_model_gpu.json
                                                         # GPU: gpt2 preset, vocab 32768, seq 1024, bf16,
                                                         # eager and torch.compile

Memory: on CUDA the peak allocated bytes of one training step; on every device also the bytes of the
non-weight tensors autograd saves for backward (counted with saved_tensors_hooks), which checkpointing cuts.

Peak memory growth (3): the highest bytes held by tensors during one forward+backward minus the bytes held
before it (weights, inputs). On CUDA `torch.cuda.max_memory_allocated`; on CPU the timeline of torch's
memory profiler (every tensor allocation and free, independent of what malloc keeps cached), run at the
shape issue 12 set its goal on: 2 layers, width 768, vocab 32768, batch 4 x 1024, fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from minicodeparrot.model.generate import generate
from minicodeparrot.model.gpt import GPT, GPTConfig, keytoken_weights

NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)  # timing should not include RNG work


def config_for(args) -> GPTConfig:
    if args.device == "cuda":
        return GPTConfig.from_preset("gpt2", vocab_size=32768, **NO_DROPOUT)
    return GPTConfig(vocab_size=32768, n_positions=256, n_embd=256, n_layer=4, n_head=4, **NO_DROPOUT)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(args):
    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, x, args, ours: bool):
    with autocast(args):
        loss = model(x, labels=x)[1] if ours else model(input_ids=x, labels=x).loss
    loss.backward()
    return loss


def time_training(model, x, args, ours: bool) -> float:
    for _ in range(args.warmup):
        train_step(model, x, args, ours)
    model.zero_grad(set_to_none=True)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, x, args, ours)
    sync(args.device)
    model.zero_grad(set_to_none=True)
    return x.numel() * args.steps / (time.perf_counter() - start)


def memory_of_step(model, x, args, ours: bool) -> dict:
    saved = [0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # count activations only: weights saved for backward exist anyway
        if t.untyped_storage().data_ptr() not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, x, args, ours)
    model.zero_grad(set_to_none=True)
    out = {"activations_saved_MiB": saved[0] / 2**20}
    if args.device == "cuda":
        out["peak_allocated_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_growth_MiB(step, device: str) -> float:
    """Highest tensor memory during `step()` minus the memory held when it starts."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    # The timeline starts with every tensor alive when profiling began (weights, inputs).
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    return (max(totals) - totals[0]) / 2**20


def loss_memory(args, config: GPTConfig) -> dict:
    """Peak memory growth of one fwd+bwd: ours (fused loss), ours with full logits, GPT2LMHeadModel."""
    if args.device == "cpu":  # issue 12's goal shape
        config = GPTConfig(vocab_size=32768, n_positions=1024, n_embd=768, n_layer=2, n_head=12, **NO_DROPOUT)
        shape, margs = (4, 1024), argparse.Namespace(**{**vars(args), "dtype": "fp32"})
    else:
        shape, margs = (args.batch_size, args.seq_length), args
    torch.manual_seed(0)
    ours = GPT(config).to(args.device).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        ref = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    ref = ref.to(args.device).train()
    x = torch.randint(0, config.vocab_size, shape, device=args.device)

    def step(model, is_ours, **kw):
        def run():
            with autocast(margs):
                loss = model(x, labels=x, **kw)[1] if is_ours else model(input_ids=x, labels=x).loss
            loss.backward()
        return run

    out = {"shape": f"{config.n_layer} layers x {config.n_embd}, vocab {config.vocab_size}, batch "
                    f"{shape[0]} x {shape[1]}, {margs.dtype}"}
    # The course's key-token weights (issue 22) ride in the same fused loss: one float per token more.
    weights = keytoken_weights(x, torch.tensor([5, 77, 900], device=args.device))
    for name, model, is_ours, kw in [("ours", ours, True, {}), ("ours_full_logits", ours, True,
                                     {"return_logits": True}), ("reference", ref, False, {}),
                                     ("ours_keytoken", ours, True, {"sequence_weights": weights})]:
        step(model, is_ours, **kw)()  # warm-up (lazy kernel set-up), then a step as the loop runs it:
        model.zero_grad(set_to_none=True)  # gradients are created by the step, so they count too
        out[name] = peak_growth_MiB(step(model, is_ours, **kw), args.device)
        model.zero_grad(set_to_none=True)
    return out


def time_generation(fn, new_tokens: int, reps: int, device) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return new_tokens * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-length", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--gen-tokens", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile rows")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (8 if gpu else 4)
    args.seq_length = args.seq_length or (1024 if gpu else 256)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup or (3 if gpu else 1)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.gen_tokens = args.gen_tokens or (128 if gpu else 32)
    torch.manual_seed(0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    config = config_for(args)
    ours = GPT(config).to(args.device).train()
    with tempfile.TemporaryDirectory() as d:  # identical weights in both models
        ours.save_pretrained(d)
        ref = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
        ref = ref.to(args.device).train()
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_length), device=args.device)
    results = {"device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "config": vars(config), "batch_size": args.batch_size, "seq_length": args.seq_length,
               "dtype": args.dtype, "rows": []}
    rows = results["rows"]

    def add(name, value, ref_value=None, unit="tok/s"):
        rows.append({"name": name, "ours": value, "reference": ref_value, "unit": unit,
                     "ratio": value / ref_value if ref_value else None})

    # 1. training throughput, eager (and compiled on GPU)
    add("train fwd+bwd", time_training(ours, x, args, True), time_training(ref, x, args, False))
    if gpu and not args.no_compile:
        c_ours, c_ref = torch.compile(ours), torch.compile(ref)
        compiled_ours = time_training(c_ours, x, args, True)
        add("train fwd+bwd compiled", compiled_ours, time_training(c_ref, x, args, False))

    # 2. activation memory with / without checkpointing (ours; the reference's own checkpointing for scale)
    plain = memory_of_step(ours, x, args, True)
    ours.gradient_checkpointing = True
    ckpt = memory_of_step(ours, x, args, True)
    ckpt_speed = time_training(ours, x, args, True)
    ours.gradient_checkpointing = False
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_ckpt = memory_of_step(ref, x, args, False)
    ref_ckpt_speed = time_training(ref, x, args, False)
    ref.gradient_checkpointing_disable()
    ref_plain = memory_of_step(ref, x, args, False)
    for key in plain:
        add(f"{key} (no ckpt)", plain[key], ref_plain[key], "MiB")
        add(f"{key} (ckpt)", ckpt[key], ref_ckpt[key], "MiB")
    add("train fwd+bwd (ckpt)", ckpt_speed, ref_ckpt_speed)

    # 3. peak memory growth of one fwd+bwd, the fused loss against full logits and the reference
    mem = loss_memory(args, config)
    results["loss_memory"] = mem
    add(f"peak growth fwd+bwd, fused loss ({mem['shape']})", mem["ours"], mem["reference"], "MiB")
    add("peak growth fwd+bwd, return_logits=True", mem["ours_full_logits"], mem["reference"], "MiB")
    add("peak growth fwd+bwd, fused key-token loss", mem["ours_keytoken"], mem["reference"], "MiB")

    # 4. greedy generation with KV cache, batch 1, from a 16-token prompt
    ours.eval()
    ref.eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    prompt = x[:1, :16]
    n = args.gen_tokens
    with autocast(args):
        t_ours = time_generation(lambda: generate(ours, prompt, n), n, 2, args.device)
        t_ref = time_generation(lambda: ref.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                     max_new_tokens=n, min_new_tokens=n, do_sample=False),
                                n, 2, args.device)
    add("generate greedy, batch 1", t_ours, t_ref)

    c = config
    print(f"device: {results['device']}, torch {torch.__version__}, batch {args.batch_size} x seq "
          f"{args.seq_length}, {args.dtype}, L/C/H {c.n_layer}/{c.n_embd}/{c.n_head}, vocab {c.vocab_size}")
    print(f"{'measure':<42}{'ours':>12}{'reference':>12}{'ratio':>8}  unit")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"{r['name']:<42}{r['ours']:>12.1f}{r['reference'] or 0:>12.1f}{ratio:>8}  {r['unit']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
