"""The pretraining loop: CodeParrot's `codeparrot_training.py`, in plain PyTorch DDP.

Launch with `torchrun --nproc_per_node=8 -m minicodeparrot.train ...` (or `minicodeparrot train ...` for one
process). Read top to bottom, one optimizer step is:

    for each of gradient_accumulation_steps micro-batches:   # DDP all-reduce only on the last one
        loss = model(batch, labels=batch) / accumulation_steps; loss.backward()
    clip grads to 1.0; AdamW step; LR scheduler step (warmup, then cosine to 0)

plus evaluation and a checkpoint every `save_checkpoint_steps` (what it holds, and why a resumed run on CPU
reproduces the uninterrupted run's losses bit for bit: `minicodeparrot.checkpoint`).

The command-line arguments live in `minicodeparrot.cli` (so `minicodeparrot --help` stays fast without
importing torch); `main(argv)` parses them with the same parser.
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
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from minicodeparrot.checkpoint import (
    gather_rank_states,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from minicodeparrot.dist import (
    DistInfo,
    all_reduce_sum,
    barrier,
    is_distributed,
    setup_distributed,
    teardown_distributed,
)
from minicodeparrot.errors import UserError
from minicodeparrot.evaluate import evaluate_loss

log = logging.getLogger("minicodeparrot.train")

# The book's two runs (NLP with Transformers, ch. 10), per GPU; and a model that learns in CPU minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "codeparrot-small": dict(
        model_config="gpt2", train_batch_size=12, valid_batch_size=12, learning_rate=5e-4,
        num_warmup_steps=2000, max_train_steps=150_000, gradient_accumulation_steps=1,
        gradient_checkpointing=False, mixed_precision="bf16", save_checkpoint_steps=15_000),
    "codeparrot": dict(
        model_config="gpt2-xl", train_batch_size=2, valid_batch_size=2, learning_rate=2e-4,
        num_warmup_steps=750, max_train_steps=50_000, gradient_accumulation_steps=16,
        gradient_checkpointing=True, mixed_precision="bf16", save_checkpoint_steps=5_000),
    "tiny": dict(
        model_config="tiny", train_batch_size=8, valid_batch_size=16, learning_rate=3e-3,
        num_warmup_steps=30, max_train_steps=400, gradient_accumulation_steps=1, seq_length=128,
        shuffle_buffer=5000, save_checkpoint_steps=200, mixed_precision="no"),
}
# What the CodeParrot scripts default to when neither the user nor a preset says otherwise.
DEFAULTS: dict[str, Any] = dict(
    model_config="gpt2", train_batch_size=8, valid_batch_size=8, weight_decay=0.1, shuffle_buffer=10_000,
    learning_rate=2e-4, lr_scheduler_type="cosine", num_warmup_steps=750, gradient_accumulation_steps=16,
    max_train_steps=50_000, max_eval_steps=-1, seq_length=1024, seed=1, save_checkpoint_steps=1024,
    keep_last=3, mixed_precision="no", gradient_checkpointing=False,
)
# Extra model settings a preset implies: the 1.5B run used Mistral's stability tweaks.
PRESET_MODEL_OVERRIDES = {
    "codeparrot": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}
TINY_MODEL = dict(n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
MODEL_PRESETS = ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# Dense bf16 peak FLOP/s by device name, for MFU. Longest key first: "H100 PCIe" before "H100".
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# --- arguments -------------------------------------------------------------------------------------------
def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset arguments from the preset, then from DEFAULTS; reject impossible values in one line."""
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    if args.preset and args.preset not in PRESETS:
        raise UserError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))
    if args.log_dir is None:
        args.log_dir = str(Path(args.output_dir) / "log")
    positive = ["train_batch_size", "valid_batch_size", "gradient_accumulation_steps", "max_train_steps",
                "seq_length", "save_checkpoint_steps", "keep_last"]
    for key in positive:
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if not args.learning_rate > 0:
        raise UserError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.weight_decay < 0:
        raise UserError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.num_warmup_steps < 0 or args.num_warmup_steps > args.max_train_steps:
        raise UserError(f"--num-warmup-steps must be in [0, --max-train-steps={args.max_train_steps}], "
                        f"got {args.num_warmup_steps}")
    if args.max_eval_steps == 0 or args.max_eval_steps < -1:
        raise UserError(f"--max-eval-steps must be -1 (all data) or >= 1, got {args.max_eval_steps}")
    if args.shuffle_buffer < 0:
        raise UserError(f"--shuffle-buffer must be >= 0, got {args.shuffle_buffer}")
    if args.max_bad_steps < 0:
        raise UserError(f"--max-bad-steps must be >= 0, got {args.max_bad_steps}")
    if not args.dataset_name_train or not args.dataset_name_valid:
        raise UserError("give the data: --dataset-name-train SRC --dataset-name-valid SRC (path or hub repo)")
    if not args.tokenizer:
        raise UserError("give --tokenizer DIR (a directory written by `minicodeparrot train-tokenizer`)")
    return args


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON/checkpoint-safe values (no handler function)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))}


# --- model -----------------------------------------------------------------------------------------------
def build_model(model_config: str, vocab_size: int, seq_length: int, preset: str | None = None,
                eos_token_id: int | None = None, pad_vocab: int = 1) -> nn.Module:
    """A fresh GPT from a preset name or a config.json, or the weights of a model directory to continue."""
    from minicodeparrot.model import GPT, GPTConfig

    overrides = dict(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                     pad_vocab_size_multiple=pad_vocab, **PRESET_MODEL_OVERRIDES.get(preset or "", {}))
    path = Path(model_config)
    if model_config in MODEL_PRESETS and not path.exists():
        if model_config == "tiny":
            config = GPTConfig(n_positions=max(256, seq_length), **TINY_MODEL, **overrides)
        else:
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
        raise UserError(f"--model-config {model_config!r} is neither a preset ({', '.join(MODEL_PRESETS)}), "
                        "a config.json file, nor a model directory")
    if config.n_positions < seq_length:
        raise UserError(f"--seq-length {seq_length} exceeds the model's n_positions={config.n_positions}")
    return model if path.is_dir() else GPT(config)


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


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, fused: bool = False):
    decay, no_decay = decay_parameter_names(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
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


# --- data ------------------------------------------------------------------------------------------------
def build_train_data(args: argparse.Namespace, tokenizer, rank: int, world_size: int):
    """This rank's endless stream of LongTensor(seq_length) blocks (its own files / records)."""
    if args.tokenized:
        from minicodeparrot.pretokenize import TokenShardDataset

        return TokenShardDataset(args.dataset_name_train, seq_length=args.seq_length, rank=rank,
                                 world_size=world_size, seed=args.seed, infinite=True)
    from minicodeparrot.packing import ConstantLengthDataset
    from minicodeparrot.shards import ShardStream

    stream = ShardStream(args.dataset_name_train, split_by_rank=True, seed=args.seed,
                         shuffle_buffer=args.shuffle_buffer, rank=rank, world_size=world_size)
    packed = ConstantLengthDataset(tokenizer, stream, seq_length=args.seq_length, infinite=True)
    return SequenceShuffler(packed, args.shuffle_buffer, seed=f"sequences-{args.seed}-{rank}")


class SequenceShuffler:
    """Shuffle packed sequences through a buffer, like the CodeParrot script's `.shuffle(buffer_size)`.

    Packing cuts each file into consecutive blocks, so without this a batch holds neighbouring pieces of
    one or two files: highly correlated gradients that stall small-batch training (the tiny preset
    plateaued at the unigram loss without it). The buffer and its RNG are part of the state, so resume
    stays exact; the buffer is stored as int32 (10,000 x 1024 tokens = 40 MB per rank).
    """

    def __init__(self, dataset, buffer_size: int, seed: str):
        self.dataset, self.size = dataset, buffer_size
        self.rng = random.Random(seed)
        self.buffer: list[torch.Tensor] = []

    def __iter__(self):
        if self.size <= 1:
            yield from self.dataset
            return
        for block in self.dataset:
            if len(self.buffer) < self.size:
                self.buffer.append(block)
                continue
            i = self.rng.randrange(self.size)
            out, self.buffer[i] = self.buffer[i], block
            yield out
        self.rng.shuffle(self.buffer)  # a finite source: hand out the rest
        while self.buffer:
            yield self.buffer.pop()

    def state_dict(self) -> dict:
        buffer = torch.stack(self.buffer).int() if self.buffer else torch.empty(0, dtype=torch.int32)
        return {"source": self.dataset.state_dict(), "buffer": buffer, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["source"])
        self.buffer = list(state["buffer"].long())
        self.rng.setstate(state["rng"])


def build_valid_data(args: argparse.Namespace, tokenizer, rank: int, world_size: int):
    """This rank's part of the validation set, in file order, read once."""
    if args.tokenized:
        from minicodeparrot.pretokenize import TokenShardDataset

        return TokenShardDataset(args.dataset_name_valid, seq_length=args.seq_length, rank=rank,
                                 world_size=world_size, seed=args.seed, infinite=False, shuffle=False)
    from minicodeparrot.packing import ConstantLengthDataset
    from minicodeparrot.shards import ShardStream

    stream = ShardStream(args.dataset_name_valid, split_by_rank=True, shuffle_files=False, shuffle_buffer=0,
                         rank=rank, world_size=world_size)
    return ConstantLengthDataset(tokenizer, stream, seq_length=args.seq_length, infinite=False)


def next_batch(blocks, batch_size: int) -> torch.Tensor | None:
    """Stack the next `batch_size` blocks; a shorter last batch, or None when the data is exhausted."""
    rows = []
    for block in blocks:
        rows.append(block)
        if len(rows) == batch_size:
            break
    return torch.stack(rows) if rows else None


# --- one optimizer step's gradients ----------------------------------------------------------------------
def accumulate_gradients(model: nn.Module, micro_batches: list[torch.Tensor], autocast,
                         scaler) -> torch.Tensor:
    """Forward + backward over the micro-batches; returns the mean loss (detached).

    Each loss is divided by the number of micro-batches so the summed gradient is the gradient of the mean,
    i.e. equal to one big batch. Under DDP the all-reduce must happen once, after the last micro-batch:
    `no_sync()` must cover the forward too, because DDP decides at forward time whether the coming backward
    synchronises (the CodeParrot scripts wrapped only the backward, and so all-reduced on every micro-step).
    """
    k = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, batch in enumerate(micro_batches):
        skip_sync = isinstance(model, DDP) and i < k - 1
        with model.no_sync() if skip_sync else nullcontext():
            with autocast:
                _, loss = model(batch, labels=batch)
            scaler.scale(loss / k).backward()
        total += loss.detach().float()
    return total / k


def valid_batches(data, batch_size: int, device: torch.device):
    it = iter(data)
    while (batch := next_batch(it, batch_size)) is not None:
        yield batch.to(device)


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


# --- the loop --------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict:
    """Run training; returns the final metrics (rank 0's view, identical on all ranks)."""
    args = resolve_args(args)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    di = setup_distributed()
    try:
        return _train(args, di)
    finally:
        teardown_distributed()


def _train(args: argparse.Namespace, di: DistInfo) -> dict:
    from minicodeparrot.tokenizer import Tokenizer

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(Path(args.log_dir), di.rank)
    log.info("world size %d, device %s", di.world_size, di.device)
    log.debug("args %s", json.dumps(plain_args(args)))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = build_model(args.model_config, len(tokenizer), args.seq_length, args.preset,
                            tokenizer.eos_token_id, pad_vocab=64 if di.device.type == "cuda" else 1)
    raw_model.gradient_checkpointing = args.gradient_checkpointing
    raw_model.to(di.device)
    torch.manual_seed(args.seed + di.rank)  # but different dropout masks per rank
    model: nn.Module = torch.compile(raw_model) if args.compile else raw_model
    if is_distributed():
        model = DDP(model, device_ids=[di.local_rank] if di.device.type == "cuda" else None)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = torch.autocast(di.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(di.device.type, enabled=args.mixed_precision == "fp16")
    optimizer = make_optimizer(raw_model, args.learning_rate, args.weight_decay,
                               fused=di.device.type == "cuda")
    scheduler = make_scheduler(optimizer, args.num_warmup_steps, args.max_train_steps, args.lr_scheduler_type)
    train_data = build_train_data(args, tokenizer, di.rank, di.world_size)

    step = 0
    if args.resume_from_checkpoint:
        path = resolve_resume(args.resume_from_checkpoint, output_dir)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", output_dir)
        else:
            state = load_checkpoint(path, raw_model, optimizer, scheduler, scaler, di.world_size)
            step = state["step"]
            train_data.load_state_dict(state["ranks"][di.rank]["data"])
            set_rng_state(state["ranks"][di.rank]["rng"])
            log.info("resumed from %s at step %d", path, step)

    flops_per_token = raw_model.estimate_flops_per_token(args.seq_length)
    peak = peak_flops(di.device)
    sequences_per_step = args.train_batch_size * args.gradient_accumulation_steps * di.world_size
    tokens_per_step = sequences_per_step * args.seq_length
    writer = metrics_file = None
    if di.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(Path(args.log_dir) / "tensorboard"))
        metrics_file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 -- closed in finally
        (output_dir / "train_args.json").write_text(json.dumps(plain_args(args), indent=2) + "\n")
        log.info("model: %.1fM parameters, %.3g FLOPs/token; %d tokens per optimizer step",
                 raw_model.num_parameters() / 1e6, flops_per_token, tokens_per_step)

    def record(entry: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    def run_eval() -> tuple[float, float]:
        data = build_valid_data(args, tokenizer, di.rank, di.world_size)
        metrics = evaluate_loss(raw_model, valid_batches(data, args.valid_batch_size, di.device),
                                args.max_eval_steps, autocast)
        loss, ppl = metrics["loss"], metrics["perplexity"]
        log.info("step %d: eval loss %.4f, perplexity %.2f", step, loss, ppl)
        if writer is not None:
            writer.add_scalar("loss/eval", loss, step)
            writer.add_scalar("perplexity", ppl, step)
        record({"step": step, "eval_loss": loss, "perplexity": ppl})
        return loss, ppl

    def checkpoint() -> None:
        states = gather_rank_states({"rng": rng_state(), "data": train_data.state_dict()}, di.world_size)
        if di.is_main:
            path = save_checkpoint(output_dir, step, raw_model, optimizer, scheduler, scaler, states,
                                   {"world_size": di.world_size, "args": plain_args(args)}, args.keep_last)
            log.info("saved checkpoint %s", path)
        barrier()

    stop = StopRequest()
    bar = None
    if di.is_main and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.max_train_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    blocks = iter(train_data)
    result: dict = {"step": step}
    bad_steps = 0
    samples = step * sequences_per_step
    model.train()
    try:
        while step < args.max_train_steps:
            t0 = time.perf_counter()
            micro = [next_batch(blocks, args.train_batch_size).to(di.device, non_blocking=True)
                     for _ in range(args.gradient_accumulation_steps)]
            loss = accumulate_gradients(model, micro, autocast, scaler)
            # One small all-reduce carries the global mean loss and "a rank was asked to stop".
            flag = torch.tensor(float(stop.requested), device=di.device)
            shared = all_reduce_sum(torch.stack([loss, flag]))
            loss_value = shared[0].item() / di.world_size
            stop_now = shared[1].item() > 0
            if not math.isfinite(loss_value):
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_steps > args.max_bad_steps:
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at step {step + 1}; lower --learning-rate or use "
                        "--mixed-precision bf16, then --resume-from-checkpoint latest (or --max-bad-steps N)")
                log.warning("loss is %s at step %d: skipped that step (%d of %d allowed)", loss_value,
                            step + 1, bad_steps, args.max_bad_steps)
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0).item()
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples += sequences_per_step

            dt = time.perf_counter() - t0
            tokens_per_s = tokens_per_step / dt
            entry = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_per_s, "samples": samples}
            if peak:
                entry["mfu"] = flops_per_token * tokens_per_s / (peak * di.world_size)
            log.debug("step %d loss %.6f lr %.3e grad_norm %.3f first_block_sum %d", step, loss_value, lr,
                      grad_norm, int(micro[0][0].sum()))
            if writer is not None:
                writer.add_scalar("loss/train", loss_value, step)
                writer.add_scalar("lr", lr, step)
                writer.add_scalar("grad_norm", grad_norm, step)
                writer.add_scalar("tokens_per_s", tokens_per_s, step)
                writer.add_scalar("samples", samples, step)
                if "mfu" in entry:
                    writer.add_scalar("mfu", entry["mfu"], step)
            record(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}")

            last = step == args.max_train_steps
            if step % args.save_checkpoint_steps == 0 or last:
                result["eval_loss"], result["perplexity"] = run_eval()
                checkpoint()
            elif stop_now:
                checkpoint()
            result.update(step=step, loss=loss_value)
            if stop_now and not last:
                log.warning("stopped at step %d by a signal; continue with --resume-from-checkpoint latest",
                            step)
                result["stopped"] = True
                return result

        if step > 0 and "eval_loss" not in result:  # resumed at the end: nothing left to train
            result["eval_loss"], result["perplexity"] = run_eval()
        if di.is_main:
            raw_model.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            log.info("saved the final model and tokenizer to %s", output_dir)
            if writer is not None:
                hparams = {k: v for k, v in plain_args(args).items() if v is not None}
                writer.add_hparams(hparams, {"hparam/eval_loss": result["eval_loss"]}, run_name="hparams")
        barrier()
        return result
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if metrics_file is not None:
            metrics_file.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point for `torchrun -m minicodeparrot.train ...`: the `minicodeparrot train` arguments."""
    from minicodeparrot.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
