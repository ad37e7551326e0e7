"""The pretraining loop: CodeParrot's `codeparrot_training.py`, in plain PyTorch DDP.

Launch with `minicodeparrot train ...` (one process) or `torchrun --nproc_per_node=8 -m minicodeparrot train
...` (DDP, the same arguments). `train(args)` reads top to bottom as four named steps:

    run = set_up(args)                           # model, optimizer, data, logs; resume from a checkpoint
    while step < max_train_steps:
        stats = optimizer_step(run)              # accumulate micro-batches, clip, AdamW, LR schedule
        log_metrics(step, stats)
        every save_checkpoint_steps: evaluate(run), save(run)   # and on SIGTERM: save, then stop

One optimizer step is:

    for each of gradient_accumulation_steps micro-batches:   # DDP all-reduce only on the last one
        loss = model(batch, labels=batch) / accumulation_steps; loss.backward()
    clip grads to 1.0; AdamW step; LR scheduler step (warmup, then cosine to 0)

A GPU runs ahead of Python: kernels are queued and Python learns a value only when it asks for it
(`.item()`, `.tolist()`, `float(t)`), which waits until the queue drains. The loop asks once per step, for
one small tensor holding the loss, the grad norm and the stop flag together (`optimizer_step`).

What a checkpoint holds, and why a resumed run on CPU reproduces the uninterrupted run's losses bit for
bit: `training/checkpoint.py`. The command-line arguments live in `minicodeparrot/cli.py` (so `--help`
stays fast without importing torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from minicodeparrot.data.loader import build_train_loader, build_valid_loader
from minicodeparrot.data.pretokenize import check_token_shards
from minicodeparrot.dist import (
    DistInfo,
    all_reduce_sum,
    barrier,
    is_distributed,
    setup_distributed,
    teardown_distributed,
)
from minicodeparrot.errors import UserError
from minicodeparrot.training.checkpoint import (
    load_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from minicodeparrot.training.checkpoint import save_checkpoint as write_checkpoint
from minicodeparrot.training.validation import evaluate_loss

log = logging.getLogger("minicodeparrot.training.train")

# The book's two runs (NLP with Transformers, ch. 10), per GPU; and a model that learns in CPU minutes.
# `model_options` are settings of the architecture that a run implies: the 1.5B run used Mistral's
# stability tweaks (scale attention by 1/layer, softmax in fp32), without which bf16 training diverged.
PRESETS: dict[str, dict[str, Any]] = {
    "codeparrot-small": dict(
        model_config="gpt2", train_batch_size=12, valid_batch_size=12, learning_rate=5e-4,
        num_warmup_steps=2000, max_train_steps=150_000, gradient_accumulation_steps=1,
        gradient_checkpointing=False, mixed_precision="bf16", save_checkpoint_steps=15_000),
    "codeparrot": dict(
        model_config="gpt2-xl", train_batch_size=2, valid_batch_size=2, learning_rate=2e-4,
        num_warmup_steps=750, max_train_steps=50_000, gradient_accumulation_steps=16,
        gradient_checkpointing=True, mixed_precision="bf16", save_checkpoint_steps=5_000, zero=True,
        model_options=dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)),
    "tiny": dict(
        model_config="tiny", train_batch_size=8, valid_batch_size=16, learning_rate=3e-3,
        num_warmup_steps=30, max_train_steps=400, gradient_accumulation_steps=1, seq_length=128,
        record_shuffle_buffer=5000, sequence_shuffle_buffer=5000, save_checkpoint_steps=200,
        mixed_precision="no"),
}
# What the CodeParrot scripts default to when neither the user nor a preset says otherwise.
DEFAULTS: dict[str, Any] = dict(
    model_config="gpt2", train_batch_size=8, valid_batch_size=8, weight_decay=0.1,
    record_shuffle_buffer=10_000, sequence_shuffle_buffer=10_000, learning_rate=2e-4,
    lr_scheduler_type="cosine", num_warmup_steps=750, gradient_accumulation_steps=16, max_train_steps=50_000,
    max_eval_steps=-1, seq_length=1024, seed=1, save_checkpoint_steps=1024, keep_last=3, mixed_precision="no",
    gradient_checkpointing=False, zero=False, data_workers=None, prefetch=4,
)

# Dense bf16 peak FLOP/s by device name, for MFU. Longest key first: "H100 PCIe" before "H100".
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# --- arguments -------------------------------------------------------------------------------------------
def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset arguments from the preset, then from DEFAULTS; reject impossible values in one line.

    What was filled in is remembered in `args.notes`, to be logged once logging is set up.
    """
    if args.preset and args.preset not in PRESETS:
        raise UserError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    given = {key for key in DEFAULTS if getattr(args, key, None) is not None}
    for key, default in DEFAULTS.items():
        if key not in given:
            setattr(args, key, preset.get(key, default))
    args.model_options = preset.get("model_options", {})
    if args.data_workers is None:  # a GPU must never wait for tokenizing; a laptop has few cores to spare
        args.data_workers = 2 if torch.cuda.is_available() else 0
    args.notes = []
    if args.log_dir is None:
        args.log_dir = str(Path(args.output_dir) / "log")
    positive = ["train_batch_size", "valid_batch_size", "gradient_accumulation_steps", "max_train_steps",
                "seq_length", "save_checkpoint_steps", "keep_last", "prefetch"]
    for key in positive:
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if not args.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.weight_decay < 0:
        raise UserError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.num_warmup_steps > args.max_train_steps and "num_warmup_steps" not in given:
        # The user shortened the run but never typed the preset's warmup: shorten the warmup with it.
        args.notes.append(f"warmup {args.num_warmup_steps} steps (from the preset) is longer than "
                          f"--max-train-steps {args.max_train_steps}: warming up over all "
                          f"{args.max_train_steps} steps instead")
        args.num_warmup_steps = args.max_train_steps
    if args.num_warmup_steps < 0 or args.num_warmup_steps > args.max_train_steps:
        raise UserError(f"--num-warmup-steps must be in [0, --max-train-steps={args.max_train_steps}], "
                        f"got {args.num_warmup_steps}")
    if args.max_eval_steps == 0 or args.max_eval_steps < -1:
        raise UserError(f"--max-eval-steps must be -1 (all data) or >= 1, got {args.max_eval_steps}")
    for key in ("record_shuffle_buffer", "sequence_shuffle_buffer", "data_workers"):
        if getattr(args, key) < 0:
            raise UserError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.max_bad_steps < 0:
        raise UserError(f"--max-bad-steps must be >= 0, got {args.max_bad_steps}")
    if not args.dataset_name_train or not args.dataset_name_valid:
        raise UserError("give the data: --dataset-name-train SRC --dataset-name-valid SRC (path or hub repo)")
    if not args.tokenizer:
        raise UserError("give --tokenizer DIR (a directory written by `minicodeparrot train-tokenizer`)")
    return args


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON/checkpoint-safe values (no handler function, no notes)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))}


# --- model -----------------------------------------------------------------------------------------------
def build_model(model_config: str, vocab_size: int, seq_length: int, eos_token_id: int | None = None,
                pad_vocab: int = 1, model_options: dict | None = None) -> nn.Module:
    """A fresh GPT from an architecture name or a config.json, or the weights of a model directory."""
    from minicodeparrot.model.gpt import GPT, GPTConfig
    from minicodeparrot.model.gpt import MODEL_CONFIGS as MODEL_CONFIGS

    overrides = dict(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                     pad_vocab_size_multiple=pad_vocab, **(model_options or {}))
    path = Path(model_config)
    if model_config in MODEL_CONFIGS and not path.exists():
        config = GPTConfig.from_preset(model_config, **overrides)
    elif path.is_file():
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--model-config {path}: not a readable JSON file ({e})") from None
        if d.get("vocab_size", vocab_size) < vocab_size:
            raise UserError(f"--model-config {path} has vocab_size {d['vocab_size']} < the tokenizer's "
                            f"{vocab_size}; remove vocab_size from the file or use a matching tokenizer")
        d = {k: v for k, v in d.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")}
        config = GPTConfig.from_hf_dict(d)
        for k, v in overrides.items():
            setattr(config, k, v)
    elif path.is_dir():
        model = GPT.from_pretrained(path, pad_vocab_size_multiple=pad_vocab)
        if model.config.vocab_size < vocab_size:
            raise UserError(f"model {path} has vocab_size {model.config.vocab_size} < the tokenizer's "
                            f"{vocab_size}; continue with the tokenizer it was trained with")
        config = model.config
    else:
        raise UserError(f"--model-config {model_config!r} is neither an architecture "
                        f"({', '.join(MODEL_CONFIGS)}), a config.json file, nor a model directory")
    if config.n_positions < seq_length:
        raise UserError(f"--seq-length {seq_length} exceeds the model's n_positions={config.n_positions}")
    return model if path.is_dir() else GPT(config)


def wrap_model(raw_model: nn.Module, dist_info: DistInfo, compile: bool) -> nn.Module:
    """DDP first, then torch.compile: the order decides whether the gradient all-reduce overlaps backward.

    DDP all-reduces a bucket of gradients as soon as autograd has produced all of them. Compiled first and
    then wrapped, the model's backward is one opaque graph that hands over every gradient at its very end,
    so all communication waits for the whole backward. Wrapped first, dynamo sees the DDP module and
    splits the graph at DDP's bucket boundaries ("DDPOptimizer"), so each bucket's all-reduce starts while
    the rest of the backward still runs, as in eager mode.
    """
    model = raw_model
    if is_distributed():
        # gradient_as_bucket_view: the gradients live inside DDP's all-reduce buckets instead of being
        # copied into them, one copy instead of two (6 GB less per rank for the 1.5B model).
        model = DDP(model, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return torch.compile(model) if compile else model


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DDP) else model


# --- optimizer and schedule ------------------------------------------------------------------------------
def decay_parameter_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) parameter names, by GPT-2's naming.

    Biases and LayerNorm gains (`ln_1`, `ln_2`, `ln_f`) are not decayed: shrinking them towards 0 has no
    regularising purpose. The book's `["bias", "LayerNorm.weight"]` was written for BERT's module names and
    matches no GPT-2 LayerNorm, so those gains were silently decayed; here every LayerNorm module is checked.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[-1] == "bias" or (len(parts) >= 2 and parts[-2] in ("ln_1", "ln_2", "ln_f")):
            no_decay.append(name)
        else:
            decay.append(name)
    missed = [f"{m}.weight" for m, mod in model.named_modules()
              if isinstance(mod, nn.LayerNorm) and f"{m}.weight" in decay]
    if missed:
        raise RuntimeError(f"LayerNorm weights not named ln_1/ln_2/ln_f would be decayed: {missed[:3]}")
    return decay, no_decay


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, fused: bool = False,
                   zero: bool = False) -> torch.optim.Optimizer:
    """AdamW with two groups (see decay_parameter_names); with `zero`, each rank keeps 1/world of its state.

    AdamW keeps two fp32 moments per parameter: 12 GB for the 1.5B model, on top of 6 GB of weights and
    6 GB of gradients, on every rank. torch's ZeroRedundancyOptimizer (ZeRO stage 1) gives each rank the
    moments of its own slice of the parameters; after its step it broadcasts the slice's new weights, so
    every rank still holds the whole model and DDP, checkpoints and evaluation work unchanged. The README
    says why this and not FSDP.
    """
    decay, no_decay = decay_parameter_names(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    if zero and is_distributed():
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=learning_rate,
                                       fused=fused or None)
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None)


def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    """LR multiplier after `step` scheduler steps: linear warmup 0 -> 1 over `warmup`, then decay to 0 at
    `total` (cosine or linear) or stay at 1 (constant). The same curve as transformers' schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup: int, total: int, kind: str):
    factor = partial(lr_factor, warmup=warmup, total=total, kind=kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- one optimizer step ----------------------------------------------------------------------------------
def accumulate_gradients(model: nn.Module, micro_batches: list[torch.Tensor], autocast,
                         scaler) -> torch.Tensor:
    """Forward + backward over the micro-batches; returns the mean loss (detached, still on the device).

    Each loss is divided by the number of micro-batches so the summed gradient is the gradient of the mean,
    i.e. equal to one big batch. Under DDP the all-reduce must happen once, after the last micro-batch:
    `no_sync()` must cover the forward too, because DDP decides at forward time whether the coming backward
    synchronises (the CodeParrot scripts wrapped only the backward, and so all-reduced on every micro-step).
    """
    k = len(micro_batches)
    ddp = unwrap_ddp(model)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, batch in enumerate(micro_batches):
        with ddp.no_sync() if ddp is not None and i < k - 1 else nullcontext():
            with autocast:
                _, loss = model(batch, labels=batch)
            scaler.scale(loss / k).backward()
        total += loss.detach().float()
    return total / k


def unwrap_ddp(model: nn.Module) -> DDP | None:
    """The DDP module inside a torch.compile wrapper (or the model itself), or None without DDP."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DDP) else None


@dataclass
class Run:
    """Everything one training run holds, built by `set_up`."""

    args: argparse.Namespace
    dist_info: DistInfo
    tokenizer: Any
    raw_model: nn.Module  # the GPT itself: checkpoints, evaluation, FLOP counts
    model: nn.Module  # what the step runs: raw_model inside DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Any
    train_data: Any
    metrics: MetricsLog
    stop: StopRequest
    step: int = 0
    bad_steps: int = 0
    batches: Any = field(default=None, repr=False)


def optimizer_step(run: Run) -> dict:
    """Take one optimizer step, or skip it when the loss is not finite; returns the step's statistics.

    The one host-device synchronisation of the step is the `.tolist()` below: the loss, the grad norm and
    the stop flag travel in one tensor, after one all-reduce. Deciding whether to skip the update needs the
    loss on the host, so this wait cannot move later; everything else stays queued on the device.
    """
    args, dist_info = run.args, run.dist_info
    t0 = time.perf_counter()
    micro, data_wait = [], 0.0
    for _ in range(args.gradient_accumulation_steps):
        t = time.perf_counter()
        micro.append(next(run.batches))
        data_wait += time.perf_counter() - t
    loss = accumulate_gradients(run.model, micro, run.autocast, run.scaler)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), 1.0)
    flag = torch.tensor(float(run.stop.requested), device=dist_info.device)
    # Under DDP the gradients (so the grad norm) are already equal on every rank: only the loss needs a sum.
    shared = all_reduce_sum(torch.stack([loss, flag, grad_norm.float() * dist_info.world_size]))
    loss_sum, stop_sum, norm_sum = shared.tolist()
    stats = {"loss": loss_sum / dist_info.world_size, "grad_norm": norm_sum / dist_info.world_size,
             "lr": run.scheduler.get_last_lr()[0], "stop": stop_sum > 0, "data_wait_s": data_wait}
    if math.isfinite(stats["loss"]):
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.step += 1
    stats["finite"] = math.isfinite(stats["loss"])
    # A skipped step's gradients must not leak into the next one: they are dropped here in both cases.
    run.optimizer.zero_grad(set_to_none=True)
    stats["seconds"] = time.perf_counter() - t0
    return stats


# --- logging ---------------------------------------------------------------------------------------------
def setup_logging(log_dir: Path, rank: int) -> None:
    """One log file per rank; rank 0 also reports INFO on stderr, the others only warnings."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("minicodeparrot")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    file_handler = logging.FileHandler(log_dir / f"debug_{rank}.log")
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(file_handler)
    logger.addHandler(console)


class MetricsLog:
    """Where the numbers go: metrics.jsonl and TensorBoard on rank 0, every rank's debug log, the bar.

    One `log_metrics(step, metrics)` call feeds them all, so the loop reads like nanoGPT's.
    """

    TENSORBOARD_NAMES = {"loss": "loss/train", "eval_loss": "loss/eval"}

    def __init__(self, args: argparse.Namespace, dist_info: DistInfo, start_step: int) -> None:
        self.writer = self.file = self.bar = None
        self.data_wait = self.wall = 0.0
        if not dist_info.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(args.log_dir) / "tensorboard"))
        self.file = open(Path(args.output_dir) / "metrics.jsonl", "a")  # noqa: SIM115 -- closed in close()
        if not args.no_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=args.max_train_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def log_metrics(self, step: int, metrics: dict) -> None:
        log.debug("step %d %s", step, " ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(self.TENSORBOARD_NAMES.get(key, key), value, step)
        if self.bar is not None and "loss" in metrics:
            self.data_wait += metrics["data_wait_s"]
            self.wall += metrics["step_s"]
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}",
                                 data_wait=f"{self.data_wait / max(self.wall, 1e-9):.0%}")

    def close(self, hparams: dict | None = None, final: dict | None = None) -> None:
        if self.writer is not None and hparams and final:
            self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in final.items()}, run_name="hparams")
        for thing in (self.bar, self.writer, self.file):
            if thing is not None:
                thing.close()
        self.bar = self.writer = self.file = None  # closing twice (end of run, then `finally`) is harmless


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 0 (preemption).

    Every step all-reduces the flag, so all ranks stop after the same step even when the signal reaches
    them a step apart, and they all take part in the checkpoint's collectives.

    A repeated SIGTERM is only logged: under SLURM a worker gets it twice at once (srun signals every
    process of the job step, and torchrun forwards its own copy), and dying on the second would lose the
    checkpoint. The senders escalate to SIGKILL on their own. A second SIGINT (Ctrl-C twice) gets the
    default behaviour back, so an interactive run that hangs can still be interrupted.

    What a user sees:
    - one process: exit status 0 and "stopped at step N; continue with --resume-from-checkpoint latest".
    - torchrun: its agent catches SIGTERM/SIGINT (also SIGHUP, SIGQUIT; see --signals-to-handle), sends the
      same signal to each worker's process group, waits up to --shutdown-timeout seconds (default 30, or
      $TORCH_ELASTIC_SHUTDOWN_TIMEOUT) for all of them, SIGKILLs the rest and then re-raises: torchrun
      prints a SignalException traceback and exits with status 1 even though every worker exited 0 with a
      complete checkpoint. Judge the run by the workers' logs (log/debug_{rank}.log: "stopped at step N")
      or the newest step_N/, not by torchrun's status. If finishing a step plus writing the checkpoint
      takes longer than 30 s (gpt2-xl: ~25 GB of weights and optimizer state), raise --shutdown-timeout.
    - SLURM: on scancel or the time limit, srun sends SIGTERM to every task process, then SIGKILL after
      the cluster's KillWait (often 30 s; `scontrol show config | grep KillWait`). Ask for an earlier
      warning with `#SBATCH --signal=TERM@120` so the checkpoint fits, and requeue with
      --resume-from-checkpoint latest.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log.warning("received %s again: still finishing this step, then checkpointing", name)
        else:
            log.warning("received %s: finishing this step, then checkpointing", name)
        self.requested = True
        if signum == signal.SIGINT:
            self.restore()

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class NonFiniteLossError(UserError):
    """The loss became NaN/inf: continuing would only write a broken checkpoint over a good one."""


# --- data ------------------------------------------------------------------------------------------------
def first_batch_logged(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches, after writing the first one's checksum to the debug log (one wait for the device, once
    per run): two ranks with the same checksum would be training on the same data."""
    batch = next(batches)
    log.debug("first batch of this run: first sequence sums to %d", int(batch[0].sum()))
    yield batch
    yield from batches


# --- the run ---------------------------------------------------------------------------------------------
def set_up(args: argparse.Namespace, dist_info: DistInfo) -> Run:
    """Build the model, optimizer, schedule and data; resume from a checkpoint if asked to."""
    from minicodeparrot.tokenizer.bpe import Tokenizer

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(Path(args.log_dir), dist_info.rank)
    log.info("world size %d, device %s", dist_info.world_size, dist_info.device)
    log.debug("args %s", json.dumps(plain_args(args)))
    for note in args.notes:
        log.info("%s", note)
    # fp32 matmuls (the parts autocast leaves in fp32) on TF32 tensor cores: 10-bit mantissas are plenty
    # for training and several times faster on A100/H100; CPU runs are unaffected.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    if args.tokenized:  # before anything is built: a mismatch is found in seconds, not at step 1
        for spec in (args.dataset_name_train, args.dataset_name_valid):
            check_token_shards(spec, len(tokenizer))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    # On a GPU the vocabulary is padded to a multiple of 64: the output projection's matmul then maps onto
    # whole tensor-core tiles (32768 already is one; GPT-2's 50257 is not).
    pad_vocab = 64 if dist_info.device.type == "cuda" else 1
    raw_model = build_model(args.model_config, len(tokenizer), args.seq_length, tokenizer.eos_token_id,
                            pad_vocab=pad_vocab, model_options=args.model_options)
    raw_model.gradient_checkpointing = args.gradient_checkpointing
    # On the device before the optimizer exists: fused AdamW and ZeRO's partitions take the parameters'
    # device as it is when they are built.
    raw_model.to(dist_info.device)
    torch.manual_seed(args.seed + dist_info.rank)  # but different dropout masks per rank
    if args.zero and dist_info.world_size == 1:
        log.info("--zero has nothing to shard in a single process: plain AdamW")
    optimizer = make_optimizer(raw_model, args.learning_rate, args.weight_decay,
                               fused=dist_info.device.type == "cuda", zero=args.zero)
    # bf16 keeps fp32's exponent range, so gradients cannot underflow and need no scaling; fp16 does,
    # hence the GradScaler (disabled, and a no-op, unless --mixed-precision fp16).
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    run = Run(
        args=args, dist_info=dist_info, tokenizer=tokenizer, raw_model=raw_model,
        model=wrap_model(raw_model, dist_info, args.compile), optimizer=optimizer,
        scheduler=make_scheduler(optimizer, args.num_warmup_steps, args.max_train_steps,
                                 args.lr_scheduler_type),
        scaler=torch.amp.GradScaler(dist_info.device.type, enabled=args.mixed_precision == "fp16"),
        autocast=torch.autocast(dist_info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        train_data=build_train_loader(
            args.dataset_name_train, tokenizer, seq_length=args.seq_length, seed=args.seed,
            batch_size=args.train_batch_size, record_shuffle_buffer=args.record_shuffle_buffer,
            sequence_shuffle_buffer=args.sequence_shuffle_buffer, tokenized=args.tokenized,
            rank=dist_info.rank, world_size=dist_info.world_size, num_workers=args.data_workers,
            prefetch=args.prefetch, device=dist_info.device),
        metrics=None, stop=StopRequest())
    if args.resume_from_checkpoint:
        path = resolve_resume(args.resume_from_checkpoint, output_dir)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", output_dir)
        else:
            state = load_checkpoint(path, raw_model, optimizer, run.scheduler, run.scaler, dist_info.rank,
                                    dist_info.world_size)
            run.step = state["step"]
            run.train_data.load_state_dict(state["rank_state"]["data"])
            # Last: building the model and the data above drew random numbers; the restored generators
            # must continue exactly where the interrupted run's stood after its checkpoint.
            set_rng_state(state["rank_state"]["rng"])
            log.info("resumed from %s at step %d", path, run.step)
    run.batches = first_batch_logged(iter(run.train_data))
    run.metrics = MetricsLog(args, dist_info, run.step)
    if dist_info.is_main:
        (output_dir / "train_args.json").write_text(json.dumps(plain_args(args), indent=2) + "\n")
        log.info("model: %.1fM parameters, %.3g FLOPs/token; %d tokens per optimizer step",
                 raw_model.num_parameters() / 1e6, raw_model.estimate_flops_per_token(args.seq_length),
                 tokens_per_step(run))
    return run


def tokens_per_step(run: Run) -> int:
    a = run.args
    return a.train_batch_size * a.gradient_accumulation_steps * run.dist_info.world_size * a.seq_length


def evaluate(run: Run) -> dict:
    """Validation loss and perplexity over this rank's share of the validation set, summed over ranks."""
    args, dist_info = run.args, run.dist_info
    loader = build_valid_loader(
        args.dataset_name_valid, run.tokenizer, seq_length=args.seq_length, batch_size=args.valid_batch_size,
        tokenized=args.tokenized, rank=dist_info.rank, world_size=dist_info.world_size,
        num_workers=args.data_workers, device=dist_info.device)
    # The unwrapped model: DDP's forward would prepare a gradient all-reduce that never comes, and every
    # rank holds the same weights anyway. Ranks may get different numbers of batches; evaluate_loss sums
    # loss and token counts over ranks, so the result is the exact mean over all validation tokens.
    with loader:
        result = evaluate_loss(run.raw_model, loader, args.max_eval_steps, run.autocast)
    log.info("step %d: eval loss %.4f, perplexity %.2f", run.step, result["loss"], result["perplexity"])
    return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}


def save(run: Run) -> None:
    """Checkpoint step_N/ (collective: every rank writes its own RNG and data state)."""
    rank_state = {"rng": rng_state(), "data": run.train_data.state_dict()}
    path = write_checkpoint(Path(run.args.output_dir), run.step, run.raw_model, run.optimizer, run.scheduler,
                            run.scaler, rank_state, {"args": plain_args(run.args)}, run.args.keep_last,
                            run.dist_info.rank, run.dist_info.world_size)
    log.info("saved checkpoint %s", path)


def train(args: argparse.Namespace) -> dict:
    """Run training; returns the final metrics (identical on all ranks)."""
    args = resolve_args(args)
    dist_info = setup_distributed()
    run = None
    try:
        run = set_up(args, dist_info)
        return train_loop(run)
    finally:
        if run is not None:
            run.stop.restore()
            run.train_data.close()  # the data workers end with the run, also when it fails
            if run.metrics is not None:
                run.metrics.close()
        teardown_distributed()


def train_loop(run: Run) -> dict:
    args = run.args
    flops_per_token = run.raw_model.estimate_flops_per_token(args.seq_length)
    peak = peak_flops(run.dist_info.device)
    result: dict = {"step": run.step}
    run.model.train()
    while run.step < args.max_train_steps:
        stats = optimizer_step(run)
        if not stats["finite"]:
            run.bad_steps += 1
            if run.bad_steps > args.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss is {stats['loss']} at step {run.step + 1}; lower --learning-rate or use "
                    "--mixed-precision bf16, then --resume-from-checkpoint latest (or --max-bad-steps N)")
            log.warning("loss is %s at step %d: skipped that step (%d of %d allowed)", stats["loss"],
                        run.step + 1, run.bad_steps, args.max_bad_steps)
            continue
        tokens_per_s = tokens_per_step(run) / stats["seconds"]
        metrics = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                   "tokens_per_s": tokens_per_s, "data_wait_s": stats["data_wait_s"],
                   "step_s": stats["seconds"],
                   "samples": run.step * args.train_batch_size * args.gradient_accumulation_steps
                   * run.dist_info.world_size}
        if peak:
            metrics["mfu"] = flops_per_token * tokens_per_s / (peak * run.dist_info.world_size)
        run.metrics.log_metrics(run.step, metrics)
        result.update(step=run.step, loss=stats["loss"])

        # The stop flag came through the step's all-reduce, so every rank sees it after the same step and
        # all of them take part in the checkpoint's barriers.
        last = run.step == args.max_train_steps
        if run.step % args.save_checkpoint_steps == 0 or last:
            result.update(evaluate(run))
            run.metrics.log_metrics(run.step, {k: result[k] for k in ("eval_loss", "perplexity")})
            save(run)
        elif stats["stop"]:
            save(run)
        if stats["stop"] and not last:
            log.warning("stopped at step %d by a signal; continue with --resume-from-checkpoint latest",
                        run.step)
            return {**result, "stopped": True}

    if "eval_loss" not in result:  # resumed at the end: nothing left to train
        result.update(evaluate(run))
    if run.dist_info.is_main:
        run.raw_model.save_pretrained(args.output_dir)
        run.tokenizer.save_pretrained(args.output_dir)
        log.info("saved the final model and tokenizer to %s", args.output_dir)
        run.metrics.close({k: v for k, v in plain_args(args).items() if v is not None},
                          {"eval_loss": result["eval_loss"]})
    barrier()  # the other ranks wait for rank 0's files, so "the run ended" means they are complete
    return result
