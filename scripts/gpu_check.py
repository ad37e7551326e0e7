"""One-shot GPU check: parity, matmul ceiling, throughput and MFU, host syncs, a resumed run, gpt2-xl.

    bash scripts/gpu_check.sh [OUT_DIR]                  # one H100/H200: at most 8 minutes, nothing installed
    GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh OUT_DIR  # tiny shapes on the CPU, the same code paths (CI)

The GPU machine has torch, numpy, transformers, regex, requests, tqdm and tensorboard and no package registry:
the repository goes on PYTHONPATH, nothing is installed. It returns at most 8 files from OUT_DIR, so OUT_DIR
gets three: gpu_check.json (everything), gpu_check.md (tables) and gpu_check_logs.tgz (each section's log and
result, the resume runs' metrics and logs). Scratch work (corpus, checkpoints) goes to a temporary directory.

Sections, each a subprocess with its own time limit (LIMITS; a crash, a CUDA error or a hang in one is written
into its entry and the next one still runs). A section saves its result each time it has something new, and
the driver copies it into gpu_check.json while the section runs, so one cut off keeps what it had.

    parity      our GPT against GPT2LMHeadModel, same weights: fp32 (TF32 off) and bf16 autocast; also the
                1.5B run's Mistral tweaks (eager reference, the only one honouring reorder_and_upcast_attn).
    ceiling     a large bf16 matmul: the TFLOP/s this GPU really reaches, against the 989.4 spec.
    throughput  codeparrot-small (gpt2, vocab 32768), bf16, seq 1024, micro-batch 12, the loop's own step
                (train.accumulate_gradients, clip, fused AdamW): ours and GPT2LMHeadModel (sdpa,
                use_cache=False), eager and torch.compile, and ours through `wrap_model` in a 1-rank NCCL
                group (DDP + compile + no_sync) with gradient accumulation 2, as torchrun runs it. Three
                repeats, interleaved; median and spread; MFU against the spec and the measured ceiling;
                dynamo graph breaks and recompiles per compiled configuration; one step each under
                sdpa_kernel(FLASH_ATTENTION) and (CUDNN_ATTENTION).
    loss_chunk  the fused loss's GPU time and peak memory per LOSS_CHUNK_ELEMENTS (bench_loss_chunk.py).
    resume      make-corpus + train-tokenizer, then 1-GPU torchrun runs of 30 steps (checkpoint every 10,
                small shuffle buffers, 2 data workers): uninterrupted; SIGKILLed after step 10 and resumed;
                and a second uninterrupted run, whose difference from the first is the noise floor the
                resume is judged against. The loop's own tokens/s and data-wait share: metrics.jsonl.
    syncs       `train` in this process under torch.cuda.set_sync_debug_mode("warn"): host syncs per step.
    xl          gpt2-xl with the `codeparrot` preset's settings (activation checkpointing, bf16, Mistral
                tweaks, vocab padded to 64): largest micro-batch (doubling, then bisection), memory and MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
SPEC_TFLOPS = 989.4  # dense bf16, H100 SXM and H200
# Seconds per section (GPU, smoke). The GPU ones sum to 470 s: 8 minutes with the driver's own seconds.
LIMITS = {"parity": (35, 90), "ceiling": (15, 30), "throughput": (150, 180), "loss_chunk": (20, 60),
          "resume": (150, 300), "syncs": (35, 120), "xl": (65, 90)}
REPEATS = 3


# --- helpers shared by the sections (each runs in a child: `gpu_check.py --section NAME --work DIR`) -----
def _device():
    import torch

    if SMOKE:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device; run with GPU_CHECK_SMOKE=1 for the CPU smoke test")
    return torch.device("cuda")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _save(work: Path, name: str, result: dict) -> None:
    """Write the section's result so far (atomically): a section killed at its time limit still reports it."""
    tmp = work / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(work / f"{name}.json")


def _spread(values: list[float]) -> dict:
    """Median and relative spread ((max - min) / median) of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "spread": (max(values) - min(values)) / med if med else None, "values": values}


def _no_dropout(config) -> None:
    config.embd_pdrop = config.attn_pdrop = config.resid_pdrop = 0.0


def _smoke_compile() -> None:
    """Smoke mode compiles with dynamo + AOT autograd but without inductor's C++ build (minutes on a CPU):
    the same torch.compile calls, graph breaks and recompiles, in seconds. tests/training/
    test_train_switches.py runs the real inductor backend on CPU."""
    import functools

    import torch

    if SMOKE:
        torch.compile = functools.partial(torch.compile, backend="aot_eager")


# --- parity ----------------------------------------------------------------------------------------------
def section_parity(work: Path) -> None:
    import torch
    import transformers

    from minicodeparrot.model.gpt import GPT, GPTConfig

    device = _device()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    shape = (2, 64) if SMOKE else (4, 1024)
    base = dict(vocab_size=32768, n_positions=1024, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    arch = dict(n_layer=2, n_embd=64, n_head=4) if SMOKE else dict(n_layer=12, n_embd=768, n_head=12)
    result: dict = {"device": str(device), "shape": list(shape), "rows": []}
    variants = [("gpt2", {}, "sdpa"),
                ("mistral tweaks", dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
                 "eager")]
    for name, tweaks, attn in variants:
        torch.manual_seed(0)
        ours = GPT(GPTConfig(**base, **arch, **tweaks))
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            ref = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation=attn)
        ours, ref = ours.to(device).train(), ref.to(device).train()
        x = torch.randint(0, 32768, shape, device=device)
        labels = x.clone()
        labels[0, : shape[1] // 4] = -100
        for dtype in ("fp32", "bf16"):
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
            with amp:
                logits, full_loss = ours(x, labels=labels, return_logits=True)
                ref_out = ref(input_ids=x, labels=labels, use_cache=False)
            ours.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            with amp:
                _, fused_loss = ours(x, labels=labels)
            fused_loss.backward()
            ref_out.loss.backward()
            g_ours = ours.transformer.h[0].mlp.c_fc.weight.grad
            g_ref = ref.transformer.h[0].mlp.c_fc.weight.grad.t()  # Conv1D layout
            row = {"model": name, "reference_attention": attn, "dtype": dtype,
                   "logits_max_abs_diff": (logits.float() - ref_out.logits.float()).abs().max().item(),
                   "loss": ref_out.loss.item(),
                   "loss_diff_full_logits": abs(full_loss.item() - ref_out.loss.item()),
                   "loss_diff_fused": abs(fused_loss.item() - ref_out.loss.item()),
                   "grad_rel_diff_h0_c_fc": ((g_ours - g_ref).norm() / g_ref.norm()).item()}
            # fp32: kernels differ in summation order only; bf16: 8 significant bits.
            tol = (1e-4, 1e-5, 1e-4) if dtype == "fp32" else (0.1, 2e-2, 3e-2)
            row["ok"] = (row["logits_max_abs_diff"] <= tol[0] and row["loss_diff_fused"] <= tol[1]
                         and row["loss_diff_full_logits"] <= tol[1]
                         and row["grad_rel_diff_h0_c_fc"] <= tol[2])
            result["rows"].append(row)
            _save(work, "parity", result)
        del ours, ref
        _free(device)


# --- ceiling ---------------------------------------------------------------------------------------------
def section_ceiling(work: Path) -> None:
    import torch

    device = _device()
    n, calls = (256, 4) if SMOKE else (8192, 100)  # 100 x 1.1 TFLOP: ~0.15 s per repeat on an H100
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    tflops = []
    for _ in range(REPEATS):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        _sync(device)
        tflops.append(2 * n**3 * calls / (time.perf_counter() - t0) / 1e12)
    s = _spread(tflops)
    _save(work, "ceiling", {"n": n, "dtype": "bf16", "tflops": s, "spec_tflops": SPEC_TFLOPS,
                            "ceiling_vs_spec": s["median"] / SPEC_TFLOPS})


# --- throughput ------------------------------------------------------------------------------------------
def _one_rank_group(device):
    """A 1-rank process group, as `torchrun --nproc_per_node=1` makes it (NCCL on a GPU, gloo on a CPU)."""
    from minicodeparrot.dist import setup_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    return setup_distributed()


class _Config:
    """One measured configuration: a model, its optimizer and the loop's step over its micro-batches."""

    def __init__(self, name, impl, compile, ddp, accum, config, batch, seq, device, dist_info):
        import torch

        from minicodeparrot.model.gpt import GPT
        from minicodeparrot.training import train as T

        self.name, self.impl, self.compile, self.ddp, self.accum = name, impl, compile, ddp, accum
        self.tokens_per_step = batch * seq * accum
        torch.manual_seed(0)
        with device:
            raw = GPT(config) if impl == "ours" else _bench_train().HFAdapter(config, False)
        self.raw = raw.to(device).train()
        if ddp:  # the production path: DDP (1 rank), then compile, exactly as train.set_up does
            self.model = T.wrap_model(self.raw, dist_info, compile)
        else:
            self.model = torch.compile(self.raw) if compile else self.raw
        self.opt = T.make_optimizer(self.raw, 1e-4, 0.1, fused=device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        g = torch.Generator(device=device).manual_seed(1)
        self.micro = [torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=g)
                      for _ in range(accum)]

    def step(self) -> None:
        import torch

        from minicodeparrot.training import train as T

        T.accumulate_gradients(self.model, self.micro, self.autocast, self.scaler)
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _dynamo_counts() -> dict:
    """dynamo's global counters, flattened: frames compiled, graphs, graph breaks (by reason)."""
    from torch._dynamo.utils import counters

    return {"frames_compiled": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
            **{f"break: {k[:200]}": v for k, v in counters["graph_break"].items()}}


def _dynamo_delta(before: dict, after: dict) -> dict:
    """What one configuration added to the counters: its compiles, graphs and graph breaks."""
    d = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    breaks = {k.removeprefix("break: "): v for k, v in d.items() if k.startswith("break: ")}
    return {"frames_compiled": d.get("frames_compiled", 0), "graphs": d.get("graphs", 0),
            "graph_breaks": sum(breaks.values()), "graph_break_reasons": breaks}


def _attention_backends(config, batch, seq, device) -> dict:
    """One training step of ours with SDPA restricted to the flash kernel, then to cuDNN's: it must run."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minicodeparrot.model.gpt import GPT

    if device.type != "cuda":
        return {"flash": "skipped: the flash and cuDNN kernels need CUDA"}
    out = {}
    model = GPT(config).to(device).train()
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend), torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, labels=x)
            loss.backward()
            torch.cuda.synchronize()
            out[name] = "ran"
        except Exception as e:  # noqa: BLE001 -- the report says which kernel failed and why
            out[name] = f"{type(e).__name__}: {str(e)[:300]}"
        model.zero_grad(set_to_none=True)
    return out


def section_throughput(work: Path) -> None:
    import torch
    import torch._dynamo

    from minicodeparrot.model.gpt import GPT, GPTConfig

    _smoke_compile()
    device = _device()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if SMOKE:
        config, batch, seq, steps = GPTConfig(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2,
                                              n_head=4), 2, 64, 2
    else:
        config, batch, seq, steps = GPTConfig.from_preset("gpt2", vocab_size=32768), 12, 1024, 20
    _no_dropout(config)
    dist_info = _one_rank_group(device)
    with torch.device("meta"):
        flops_per_token = GPT(config).estimate_flops_per_token(seq)
    ceiling = json.loads((work / "ceiling.json").read_text())["tflops"]["median"] \
        if (work / "ceiling.json").is_file() else None
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "batch": batch, "seq": seq, "steps_per_repeat": steps, "repeats": REPEATS,
                    "flops_per_token": flops_per_token, "ceiling_tflops": ceiling, "rows": {}, "errors": {}}
    plans = [("ours eager", "ours", False, False, 1), ("transformers eager", "hf", False, False, 1),
             ("ours compile", "ours", True, False, 1), ("transformers compile", "hf", True, False, 1),
             ("ours DDP+compile accum 2", "ours", True, True, 2)]
    configs, start, limit = [], time.time(), LIMITS["throughput"][1 if SMOKE else 0]
    for name, impl, compile, ddp, accum in plans:  # build and warm up (compile) each, eager ones first
        if time.time() - start > 0.6 * limit:  # the rest of the time is for the timed repeats
            result["errors"][name] = f"skipped: warm-ups used {time.time() - start:.0f} s of the {limit} s"
            continue
        try:
            before, t0 = _dynamo_counts(), time.perf_counter()
            c = _Config(name, impl, compile, ddp, accum, config, batch, seq, device, dist_info)
            c.step()
            c.step()
            _sync(device)
            row = {"impl": impl, "compile": compile, "ddp": ddp, "gradient_accumulation": accum,
                   "warmup_s": time.perf_counter() - t0}
            if compile:  # the first compile, and any graph breaks it found
                row["dynamo_warmup"] = _dynamo_delta(before, _dynamo_counts())
            result["rows"][name] = row
            configs.append(c)
        except Exception as e:  # noqa: BLE001 -- one failing configuration must not lose the others
            result["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
            _free(device)
        _save(work, "throughput", result)
    recompiles = {c.name: 0 for c in configs}
    for _ in range(REPEATS):  # interleaved: a slow moment of the machine hits every configuration alike
        for c in configs:
            before = _dynamo_counts()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step()
            _sync(device)
            row = result["rows"][c.name]
            seconds = time.perf_counter() - t0
            row.setdefault("tokens_per_s_runs", []).append(c.tokens_per_step * steps / seconds)
            # Frames compiled after the warm-up are recompiles: the graphs should be stable by then.
            recompiles[c.name] += _dynamo_delta(before, _dynamo_counts())["frames_compiled"]
            if c.compile:
                row["recompiles_while_timed"] = recompiles[c.name]
        _summarise(result, flops_per_token, ceiling, device)
        _save(work, "throughput", result)
    result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del configs
    _free(device)
    result["attention_kernels"] = _attention_backends(config, batch, seq, device)
    _save(work, "throughput", result)


def _summarise(result: dict, flops_per_token: float, ceiling: float | None, device) -> None:
    for row in result["rows"].values():
        if "tokens_per_s_runs" not in row:
            continue
        s = _spread(row["tokens_per_s_runs"])
        row["tokens_per_s"], row["spread"] = s["median"], s["spread"]
        achieved = flops_per_token * s["median"] / 1e12
        row["tflops"] = achieved
        row["mfu_vs_spec"] = achieved / SPEC_TFLOPS if device.type == "cuda" else None
        row["mfu_vs_ceiling"] = achieved / ceiling if ceiling else None
    tps = {n: r["tokens_per_s"] for n, r in result["rows"].items() if "tokens_per_s" in r}
    pairs = [("ours compile", "transformers compile"), ("ours compile", "transformers eager"),
             ("ours eager", "transformers eager"), ("ours DDP+compile accum 2", "ours compile")]
    result["ratios"] = {f"{a} / {b}": tps[a] / tps[b] for a, b in pairs if a in tps and b in tps}
    mfu = result["rows"].get("ours compile", {}).get("mfu_vs_spec")
    eager, compiled = (result["ratios"].get(f"ours compile / transformers {k}") for k in ("eager", "compile"))
    result["goals"] = {"ours compile >= 50% MFU (spec)": None if mfu is None else mfu >= 0.5,
                       "ours compile >= 2x transformers eager": None if eager is None else eager >= 2,
                       "ours compile >= 1.1x transformers compile":
                           None if compiled is None else compiled >= 1.1}


def _bench_train():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train

    return bench_train


# --- loss chunk ------------------------------------------------------------------------------------------
def section_loss_chunk(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_loss_chunk

    device = _device()
    if SMOKE:
        rows = bench_loss_chunk.measure(device, 256, 64, 1000, False, [2**14, 2**16], reps=REPEATS, calls=1)
    else:
        rows = bench_loss_chunk.measure(device, 12 * 1024, 768, 32768, True, bench_loss_chunk.SIZES)
    _save(work, "loss_chunk", {"device": str(device), "rows": rows})


# --- resume ----------------------------------------------------------------------------------------------
def _run(cmd: list[str], log, timeout: float, env: dict) -> None:
    """Run a command into the log; on failure raise with its own error lines, not a torchrun traceback."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = log.tell()
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if r.returncode != 0:
        log.flush()
        with open(log.name, errors="replace") as f:
            f.seek(start)
            errors = [line.strip() for line in f if "error" in line.lower()][:5]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {r.returncode}: " + " | ".join(errors))


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if SMOKE:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # a CPU (gloo) run even on a GPU machine
    return env


def _corpus(work: Path, log) -> tuple[Path, Path]:
    """The stdlib corpus and a BPE tokenizer trained on it (built once, by whichever section needs it)."""
    py, env = sys.executable, _env()
    corpus, tok = work / "corpus", work / "tokenizer"
    if not (corpus / "valid").is_dir():
        sources = ([f"--source={Path(sysconfig.get_paths()['stdlib']) / d}" for d in ("json", "email")]
                   + ["--validation-fraction", "0.2"]) if SMOKE else []
        _run([py, "-m", "minicodeparrot", "make-corpus", "--output", str(corpus), "--no-progress", *sources],
             log, 120, env)
    if not (tok / "tokenizer.json").is_file():
        _run([py, "-m", "minicodeparrot", "train-tokenizer", "--dataset", str(corpus / "train"),
              "--vocab-size", "1000" if SMOKE else "32768", "--output", str(tok), "--no-progress"],
             log, 120, env)
    return corpus, tok


def _metrics(path: Path) -> dict[int, dict]:
    """Training entries of metrics.jsonl by step (the last one written wins: a resumed run rewrites)."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "loss" in entry:
                rows[entry["step"]] = entry
    return rows


def _train_args(corpus: Path, tok: Path, steps: int, every: int) -> list[str]:
    model = (["--preset", "tiny", "--seq-length", "64", "--train-batch-size", "2", "--valid-batch-size", "2"]
             if SMOKE else ["--preset", "codeparrot-small"])
    return [*model, "--tokenizer", str(tok), "--dataset-name-train", str(corpus / "train"),
            "--dataset-name-valid", str(corpus / "valid"), "--max-train-steps", str(steps),
            "--save-checkpoint-steps", str(every), "--num-warmup-steps", "2", "--max-eval-steps", "2",
            "--gradient-accumulation-steps", "1", "--record-shuffle-buffer", "200",
            "--sequence-shuffle-buffer", "100", "--data-workers", "2", "--no-progress"]


def _loss_diffs(a: dict, b: dict, after: int = 0) -> dict:
    diffs = {s: abs(a[s]["loss"] - b[s]["loss"]) for s in sorted(a) if s in b and s > after}
    return {"max": max(diffs.values(), default=None), "steps": len(diffs),
            "bitwise_equal": sum(d == 0 for d in diffs.values())}


def section_resume(work: Path) -> None:
    py, env = sys.executable, _env()
    result: dict = {}
    log = open(work / "resume_commands.log", "w")  # noqa: SIM115 -- closed at the end
    t0 = time.time()
    corpus, tok = _corpus(work, log)
    result["setup_s"] = time.time() - t0
    steps, every = (6, 2) if SMOKE else (30, 10)
    result.update(steps=steps, checkpoint_every=every)
    args = _train_args(corpus, tok, steps, every)
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "minicodeparrot", "train"]
    runs = {name: work / "resume_runs" / name for name in ("ref", "cut", "noise")}
    for d in runs.values():  # a rerun starts every run afresh (corpus and tokenizer are kept)
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    _run([*torchrun, *args, "--output-dir", str(runs["ref"])], log, 300, env)
    result["reference_run_s"] = time.time() - t0
    ref = _metrics(runs["ref"] / "metrics.jsonl")
    result.update(_loop_speed(ref))
    _save(work, "resume", result)

    # The same run, SIGKILLed (torchrun, its trainer and the data workers) once step `every` is saved.
    log.write("$ (killed after the first checkpoint) " + " ".join([*torchrun, *args]) + "\n")
    log.flush()
    proc = subprocess.Popen([*torchrun, *args, "--output-dir", str(runs["cut"])], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (work / "resume.pgid").write_text(str(proc.pid))  # the driver kills this tree too if we time out
    while not (runs["cut"] / f"step_{every}").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    result["killed_after_step"] = max(_metrics(runs["cut"] / "metrics.jsonl"), default=0)
    result["resumed_from_step"] = max((int(p.name.split("_")[1]) for p in runs["cut"].glob("step_*")
                                       if p.name.split("_")[1].isdigit()), default=0)
    _run([*torchrun, *args, "--output-dir", str(runs["cut"]), "--resume-from-checkpoint", "latest"], log, 300,
         env)
    result["resume_vs_uninterrupted"] = _loss_diffs(ref, _metrics(runs["cut"] / "metrics.jsonl"),
                                                    result["resumed_from_step"])
    _save(work, "resume", result)

    # Noise floor: the same uninterrupted run again. GPU kernels (atomics in backward, split-K matmuls) need
    # not be bitwise reproducible, so "resume is exact" means: no larger than this difference.
    _run([*torchrun, *args, "--output-dir", str(runs["noise"])], log, 300, env)
    result["noise_floor"] = _loss_diffs(ref, _metrics(runs["noise"] / "metrics.jsonl"),
                                        result["resumed_from_step"])
    floor, resumed = result["noise_floor"]["max"], result["resume_vs_uninterrupted"]["max"]
    result["resume_within_noise_floor"] = None if floor is None or resumed is None else resumed <= floor
    log.close()
    _save(work, "resume", result)


def _loop_speed(metrics: dict[int, dict]) -> dict:
    """The training loop's own tokens/s and data-wait share (metrics.jsonl), after 5 warm-up steps."""
    rows = [m for s, m in sorted(metrics.items()) if s > 5] or list(metrics.values())
    if not rows or any("data_wait_s" not in m or "step_s" not in m for m in rows):
        return {"loop_error": "metrics.jsonl entries lack data_wait_s or step_s"}
    wall = sum(m["step_s"] for m in rows)
    share = sum(m["data_wait_s"] for m in rows) / wall
    return {"loop_tokens_per_s_median": statistics.median(m["tokens_per_s"] for m in rows),
            "loop_mfu_median": statistics.median(m["mfu"] for m in rows) if "mfu" in rows[0] else None,
            "loop_data_wait_share": share, "loop_max_data_wait_s": max(m["data_wait_s"] for m in rows),
            "goal data wait <= 1%": share <= 0.01}


# --- syncs -----------------------------------------------------------------------------------------------
def section_syncs(work: Path) -> None:
    """Host-device syncs per optimizer step of the real loop: the difference between a 4-step and a 10-step
    run (both evaluate and checkpoint once, at the end) divided by 6. On a GPU counted by CUDA itself
    (set_sync_debug_mode warns at each synchronising call); in smoke mode, on a CPU, that mode does not
    exist and the count is of the host reads (.item(), .tolist(), ...) made by the loop's module."""
    import torch

    from minicodeparrot.cli import build_parser
    from minicodeparrot.training import train as T

    device = _device()
    with open(work / "syncs_commands.log", "w") as log:
        corpus, tok = _corpus(work, log)
    counts = {"n": 0}
    if device.type != "cuda":
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"):
            real = getattr(torch.Tensor, name)

            def counting(self, *a, _real=real, **k):
                if sys._getframe(1).f_code.co_filename == T.__file__:
                    counts["n"] += 1
                return _real(self, *a, **k)

            setattr(torch.Tensor, name, counting)
    result: dict = {"counted_by": "cuda sync debug mode" if device.type == "cuda" else "host reads (CPU)"}

    def run(steps: int) -> int:
        argv = [*_train_args(corpus, tok, steps, 1000), "--preset", "tiny", "--seq-length", "128",
                "--gradient-accumulation-steps", "2", "--output-dir", str(work / "syncs_runs" / str(steps))]
        args = build_parser().parse_args(["train", *argv])
        counts["n"] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                T.train(args)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
        return len(syncs) if device.type == "cuda" else counts["n"]

    short, long_ = run(4), run(10)
    result.update(syncs_4_steps=short, syncs_10_steps=long_, syncs_per_step=(long_ - short) / 6)
    _save(work, "syncs", result)


# --- xl --------------------------------------------------------------------------------------------------
def section_xl(work: Path) -> None:
    import torch

    from minicodeparrot.model.gpt import GPT, GPTConfig
    from minicodeparrot.training.config import PRESETS

    device = _device()
    torch.backends.cuda.matmul.allow_tf32 = True
    preset = PRESETS["codeparrot"]  # the 1.5B run's real settings
    options = {k: preset[k] for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")}
    arch = "tiny" if SMOKE else preset["model_config"]
    config = GPTConfig.from_preset(arch, vocab_size=1000 if SMOKE else 32768, **options,
                                   pad_vocab_size_multiple=64 if device.type == "cuda" else 1)
    _no_dropout(config)  # as in throughput: dropout is not what limits the batch
    seq, cap, time_cap = (64, 4, 30.0) if SMOKE else (1024, 256, 55.0)
    bf16 = preset["mixed_precision"] == "bf16"
    with torch.device("meta"):
        flops_per_token = GPT(config).estimate_flops_per_token(seq)
    result: dict = {"preset": {k: v for k, v in preset.items() if k not in options},
                    "model_options": options,
                    "seq": seq, "bf16": bf16, "gradient_checkpointing": preset["gradient_checkpointing"],
                    "flops_per_token": flops_per_token, "probes": [],
                    "zero": "one GPU is one rank: --zero has nothing to shard, plain AdamW (as train logs)"}
    start = time.time()

    def fits(batch: int) -> bool:
        row = None
        try:
            row = _xl_probe(config, batch, seq, bf16, preset["gradient_checkpointing"], device,
                            flops_per_token)
        except torch.OutOfMemoryError:
            pass
        _free(device)  # outside the except block: the traceback no longer pins the tensors
        result["probes"].append({"batch": batch, "fits": row is not None, **(row or {})})
        if row is not None and (result.get("best") is None or batch > result["best"]["batch"]):
            result["best"] = {"batch": batch, **row}
        _save(work, "xl", result)
        return row is not None

    lo, hi, batch = 0, None, 1  # lo fits (0: nothing yet), hi does not
    while hi is None and batch <= cap and time.time() - start < time_cap:
        if fits(batch):
            lo, batch = batch, batch * 2
        else:
            hi = batch
    while hi is not None and hi - lo > 1 and time.time() - start < time_cap:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    result.update(largest_micro_batch=lo, smallest_failing_batch=hi, search_s=time.time() - start,
                  search_complete=(hi is not None and hi - lo <= 1) or batch > cap)
    _save(work, "xl", result)


def _xl_probe(config, batch, seq, bf16, ckpt, device, flops_per_token) -> dict:
    import torch

    from minicodeparrot.model.gpt import GPT
    from minicodeparrot.training import train as T

    torch.manual_seed(0)
    with device:  # initialised on the device: a CPU init of 1.5B weights takes seconds per probe
        model = GPT(config)
    model.gradient_checkpointing = ckpt
    model.train()
    opt = T.make_optimizer(model, 2e-4, 0.1, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):  # the first is warm-up
        _sync(device)
        t0 = time.perf_counter()
        T.accumulate_gradients(model, [x], autocast, scaler)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    tokens_per_s = batch * seq / times[1]
    return {"tokens_per_s": tokens_per_s,
            "mfu_vs_spec": flops_per_token * tokens_per_s / (SPEC_TFLOPS * 1e12)
            if device.type == "cuda" else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


SECTIONS = {"parity": section_parity, "ceiling": section_ceiling, "throughput": section_throughput,
            "loss_chunk": section_loss_chunk, "resume": section_resume, "syncs": section_syncs,
            "xl": section_xl}


# --- the driver ------------------------------------------------------------------------------------------
def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process below it. A process group is not enough: torchrun starts each
    trainer in a session of its own, and the trainer's data workers are in theirs."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def preflight() -> tuple[str, bool]:
    """One line: Python, torch, CUDA, GPU, driver, transformers; and whether a CUDA device is there."""
    parts = [f"python {platform.python_version()}"]
    has_cuda = False
    try:
        import torch

        has_cuda = torch.cuda.is_available()
        parts += [f"torch {torch.__version__}", f"cuda {torch.version.cuda or 'none (CPU build)'}"]
        if has_cuda:
            parts.append(f"gpu {torch.cuda.get_device_name()} x{torch.cuda.device_count()}")
    except ImportError as e:
        parts.append(f"torch missing ({e})")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split()
        parts.append(f"driver {driver[0] if driver else 'unknown'}")
    except (OSError, subprocess.TimeoutExpired):
        parts.append("driver: no nvidia-smi")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        parts.append("transformers missing (parity and reference rows will fail)")
    return "[gpu_check] preflight: " + ", ".join(parts), has_cuda


def run_section(name: str, work: Path, report: dict, publish) -> dict:
    limit = LIMITS[name][1 if SMOKE else 0]
    result_file = work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    t0 = time.time()
    entry = {"status": "running", "limit_s": limit}
    report["sections"][name] = entry
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--section", name, "--work", str(work)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_env())
        seen, rc = 0.0, None
        while rc is None and time.time() - t0 < limit:
            try:
                rc = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            if result_file.is_file() and result_file.stat().st_mtime != seen:  # copy partial results out
                seen = result_file.stat().st_mtime
                entry.update(seconds=round(time.time() - t0, 1), result=json.loads(result_file.read_text()))
                publish(report)
        if rc is None:
            kill_tree(proc.pid)  # the section and whatever it started (torchrun, trainers, data workers)
            proc.wait()
    pgid_file = work / f"{name}.pgid"  # a process tree the section started apart from its own
    if pgid_file.is_file():
        kill_tree(int(pgid_file.read_text()))
        pgid_file.unlink()
    entry.update(status="timeout" if rc is None else "ok" if rc == 0 else "failed", returncode=rc,
                 seconds=round(time.time() - t0, 1))
    if result_file.is_file():
        entry["result"] = json.loads(result_file.read_text())
    if entry["status"] != "ok":
        tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-15:]
        entry["error"] = "\n".join(tail)
    print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s (limit {limit} s)", flush=True)
    return entry


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def _table(rows: list[dict], keys: list[str]) -> list[str]:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]


def _section_md(name: str, r: dict) -> list[str]:
    if name == "parity" and r.get("rows"):
        return _table(r["rows"], ["model", "dtype", "logits_max_abs_diff", "loss_diff_full_logits",
                                  "loss_diff_fused", "grad_rel_diff_h0_c_fc", "ok"])
    if name == "throughput" and r.get("rows"):
        rows = [{"name": n, **v} for n, v in r["rows"].items()]
        lines = _table(rows, ["name", "tokens_per_s", "spread", "tflops", "mfu_vs_spec", "mfu_vs_ceiling",
                              "warmup_s"])
        lines += [""] + [f"- {k}: {v:.2f}x" for k, v in r.get("ratios", {}).items()]
        lines += [f"- goal {k}: {v}" for k, v in r.get("goals", {}).items()]
        for row in rows:
            if "dynamo_warmup" in row:
                d = row["dynamo_warmup"]
                lines.append(f"- {row['name']}: {d['frames_compiled']} frames compiled, "
                             f"{d['graphs']} graphs, {d['graph_breaks']} graph breaks "
                             f"{d['graph_break_reasons'] or ''}; "
                             f"{row.get('recompiles_while_timed')} recompiles while timed")
        lines += [f"- attention kernel {k}: {v}" for k, v in r.get("attention_kernels", {}).items()]
        return lines + [f"- failed: {k}: {v}" for k, v in r.get("errors", {}).items()]
    if name in ("loss_chunk",) and r.get("rows"):
        return _table(r["rows"], ["chunk_elements", "chunk_tokens", "ms_median", "ms_min", "ms_max",
                                  "peak_mib"])
    if name == "xl" and r:
        lines = _table(r.get("probes", []), ["batch", "fits", "tokens_per_s", "mfu_vs_spec", "peak_mem_gib"])
        return lines + ["", f"- largest micro-batch: {r.get('largest_micro_batch')} (search complete: "
                            f"{r.get('search_complete')}); zero: {r.get('zero')}"]
    return [f"- {k}: {json.dumps(v, default=str) if isinstance(v, dict) else _fmt(v)}" for k, v in r.items()]


def markdown(report: dict) -> str:
    s = report["sections"]
    lines = [f"# GPU check ({'CPU smoke test' if report['smoke'] else report['device']})", "",
             report["preflight"], "", f"{report['started']}, total {report.get('seconds')} s", "",
             "| section | status | seconds | limit |", "|---|---|---:|---:|"]
    lines += [f"| {n} | {e['status']} | {e.get('seconds')} | {e['limit_s']} |" for n, e in s.items()]
    for name, entry in s.items():
        lines += ["", f"## {name}", ""] + _section_md(name, entry.get("result") or {})
        if entry["status"] not in ("ok", "running"):
            lines += ["", f"**{entry['status']}**:", "", "```", entry.get("error", ""), "```"]
    return "\n".join(lines) + "\n"


def publisher(out: Path, work: Path, t0: float):
    """Write the report's three files (json, md, tgz of the logs): at most 8 files come back from OUT."""
    def publish(report: dict) -> None:
        report["seconds"] = round(time.time() - t0, 1)
        for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str)),
                           ("gpu_check.md", markdown(report))):
            (out / f"{name}.tmp").write_text(text)
            (out / f"{name}.tmp").replace(out / name)
        with tarfile.open(out / "gpu_check_logs.tgz.tmp", "w:gz") as tar:
            for p in sorted(work.rglob("*")):  # logs, metrics, results; no weights, corpus or tokenizer
                wanted = p.suffix in (".log", ".jsonl") or p.parent == work and p.suffix == ".json"
                if wanted and p.is_file() and p.stat().st_size < 20_000_000:
                    tar.add(p, arcname=str(p.relative_to(work)))
        (out / "gpu_check_logs.tgz.tmp").replace(out / "gpu_check_logs.tgz")
    return publish


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="directory for the json, markdown and logs")
    ap.add_argument("--section", choices=list(SECTIONS), help="run one section in this process (internal)")
    ap.add_argument("--work", help="scratch directory (internal; default: a new temporary directory)")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.section:
        SECTIONS[args.section](Path(args.work))
        return
    line, has_cuda = preflight()
    print(line, flush=True)
    if not has_cuda and not SMOKE:
        print("[gpu_check] no CUDA device on this machine: nothing measured (GPU_CHECK_SMOKE=1 runs the CPU "
              "smoke test)", flush=True)
        sys.exit(2)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    t0 = time.time()
    report = {"smoke": SMOKE, "preflight": line, "torch": torch.__version__, "work_dir": str(work),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "device": torch.cuda.get_device_name() if has_cuda and not SMOKE else "cpu", "sections": {}}
    publish = publisher(out, work, t0)
    for name in args.only or SECTIONS:
        run_section(name, work, report, publish)
        publish(report)
    failed = [n for n, e in report["sections"].items() if e["status"] != "ok"]
    print(f"[gpu_check] {len(report['sections']) - len(failed)} of {len(report['sections'])} sections ok"
          + (f" (not ok: {', '.join(failed)})" if failed else "") + f" in {report['seconds']} s; wrote "
          f"{out / 'gpu_check.json'}, gpu_check.md, gpu_check_logs.tgz", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
