"""The pretraining loop: CodeParrot's `codeparrot_training.py`, in plain PyTorch DDP.

Launch with `minicodeparrot train ...` (one process) or `torchrun --nproc_per_node=8 -m minicodeparrot train
...` (DDP, the same arguments). The file reads top down, as nanoGPT's train.py does:

    train(args)                    # config, process group, set_up, the loop, tear-down
      train_loop(run)              # while step < max_train_steps: one optimizer step, log, evaluate, save
        optimizer_step(run)        # accumulate micro-batches, clip, AdamW, LR schedule
          accumulate_gradients     # forward + backward, DDP all-reduce on the last micro-batch only
      evaluate(run), save(run)     # validation loss; a checkpoint step_N/
    set_up(cfg, dist_info)         # model, optimizer, schedule, data, logs; resume from a checkpoint
    ... then the helpers: building the model and optimizer, logging, signals.

A GPU runs ahead of Python: kernels are queued and Python learns a value only when it asks for it
(`.item()`, `.tolist()`, `float(t)`), which waits until the queue drains. The loop asks once per step, for
one small tensor holding the loss, the grad norm and the stop flag together (`optimizer_step`).

The settings and their defaults live in `config.py` (`TrainConfig`). What a checkpoint holds, and why a
resumed run on CPU reproduces the uninterrupted run's losses bit for bit: `checkpoint.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from minicodeparrot.data.loader import build_valid_loader
from minicodeparrot.data.pretokenize import check_token_shards
from minicodeparrot.data.streams import (
    DataLayout,
    accumulation_steps,
    build_train_loader,
    new_layout,
    stateless_checkpoint_message,
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
from minicodeparrot.training.checkpoint import (
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from minicodeparrot.training.checkpoint import save_checkpoint as write_checkpoint
from minicodeparrot.training.config import (
    TrainConfig,
    check_config,
    config_dict,
    given_values,
    resolve_config,
    shorten_warmup,
)
from minicodeparrot.training.validation import evaluate_loss

log = logging.getLogger("minicodeparrot.train")

# Dense bf16 peak FLOP/s by device name, for MFU. Longest key first: "H100 PCIe" before "H100".
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# --- the run ---------------------------------------------------------------------------------------------
def train(args: argparse.Namespace | TrainConfig) -> dict:
    """Run training (the `train` command's parsed arguments, or a TrainConfig); returns the final metrics,
    identical on all ranks."""
    given = config_dict(args) if isinstance(args, TrainConfig) else given_values(args)
    cfg, notes = resolve_config(given, None if isinstance(args, TrainConfig) else args.preset)
    if cfg.mixed_precision == "auto":  # the course trained in fp16 on GPUs without bf16
        cfg.mixed_precision = ("no" if not torch.cuda.is_available() else
                               "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if cfg.data_workers is None:  # a GPU must never wait for tokenizing; a laptop has few cores to spare
        cfg.data_workers = 2 if torch.cuda.is_available() else 0
    dist_info = setup_distributed(timeout=timedelta(minutes=cfg.dist_timeout))
    run = None
    try:
        run = set_up(cfg, dist_info, notes, warmup_typed="num_warmup_steps" in given)
        return train_loop(run)
    finally:
        if run is not None:
            run.stop.restore()
            run.train_data.close()  # the data workers end with the run, also when it fails
            run.metrics.close()
            if run.pusher is not None:  # waits for the last upload; what never got there is logged
                run.pusher.close()
        teardown_distributed()


def train_loop(run: Run) -> dict:
    """nanoGPT's loop: step, log, and every `save_checkpoint_steps` evaluate and save; stop on a signal."""
    cfg = run.cfg
    result: dict = {"step": run.step}
    run.model.train()
    while run.step < cfg.max_train_steps:
        stats = optimizer_step(run)
        if not stats["finite"]:  # nothing was updated: the step counter stays, the batches are spent
            skip_bad_step(run, stats)
            continue
        run.step += 1  # counts optimizer updates taken, so it equals the scheduler's step count
        run.metrics.log_metrics(run.step, step_metrics(run, stats))
        result.update(step=run.step, loss=stats["loss"])

        # The stop flag came through the step's all-reduce, so every rank sees it after the same step and
        # all of them take part in the checkpoint's barriers.
        last = run.step == cfg.max_train_steps
        if run.step % cfg.save_checkpoint_steps == 0 or last:
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
    save_final_model(run, result)
    return result


# --- one optimizer step ----------------------------------------------------------------------------------
def optimizer_step(run: Run) -> dict:
    """Take one optimizer step, or skip it when the loss is not finite; returns the step's statistics.

    It does not advance `run.step`: the loop does, only for a step that updated the weights.

    The one host-device synchronisation of the step is the `.tolist()` below: the loss, the stop flag and
    the grad norm travel in one tensor. Deciding whether to skip the update needs the loss on the host, so
    this wait cannot move later; everything else stays queued on the device. Just before it, the next
    step's batches are received (`stage`), so that work overlaps the GPU's instead of following it.
    `data_wait_s` is the host's time getting batches, staging included (on a GPU mostly overlapped).
    """
    cfg, dist_info = run.cfg, run.dist_info
    t0 = time.perf_counter()
    micro = [next(run.batches) for _ in range(cfg.gradient_accumulation_steps)]  # staged last step
    data_wait = time.perf_counter() - t0
    loss = accumulate_gradients(run.model, micro, run.autocast, run.scaler, run.sequence_weights)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.max_grad_norm)
    # The loss differs per rank (each saw its own batches) and so may the stop flag: both are summed over
    # ranks. The grad norm needs no collective: DDP already made the gradients equal on every rank. It only
    # joins the summed values so that all of them reach the host in one wait.
    # The batch hash is summed too: each rank hashed its own sequences. float64 carries the sums exactly
    # (a hash sum stays below 2**53).
    # fill_ hands the number to the device as a kernel argument: nothing is read from host memory, so the
    # host waits for nothing. torch.tensor(x, device="cuda") copies from pageable host memory, which makes
    # the host wait until the GPU has drained its queue: a second, hidden sync every step.
    run.stop_flag.fill_(float(run.stop.requested))
    hashes = sum(batch_hashes(batch, run.hash_weights) for batch in micro)
    summed = all_reduce_sum(torch.stack([loss.double(), run.stop_flag.double(), hashes.double()]))
    summary = torch.cat([summed, grad_norm.double().view(1)])
    t = time.perf_counter()
    run.train_data.stage(cfg.gradient_accumulation_steps)  # a checkpoint still excludes staged batches
    data_wait += time.perf_counter() - t
    loss_mean, stop, batch_hash, norm = summary.tolist()
    loss_mean /= dist_info.world_size
    # get_last_lr() before scheduler.step(): the LR this update used. Step 1's is 0, since warmup starts at
    # factor 0/warmup; transformers' get_cosine_schedule_with_warmup does the same (the book's runs too).
    stats = {"loss": loss_mean, "grad_norm": norm, "lr": run.scheduler.get_last_lr()[0], "stop": stop > 0,
             "data_wait_s": data_wait, "finite": math.isfinite(loss_mean), "batch_hash": int(batch_hash)}
    if stats["finite"]:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
    # A skipped step's gradients must not leak into the next one: they are dropped here in both cases.
    run.optimizer.zero_grad(set_to_none=True)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def accumulate_gradients(model: nn.Module, micro_batches: list[torch.Tensor], autocast, scaler,
                         sequence_weights: Callable | None = None) -> torch.Tensor:
    """Forward + backward over the micro-batches; returns the mean loss (detached, still on the device).

    Each loss is divided by the number of micro-batches k so the summed gradient is the gradient of the
    mean, i.e. equal to one big batch. That is exact only because every micro-batch predicts the same
    number of tokens: no label is ignored (packing leaves no padding), so each micro-batch's mean loss is
    over (batch x (seq_length - 1)) tokens. With padding (ignore_index) the token counts would differ and
    a mean of means would weigh tokens unequally.

    Under DDP the all-reduce must happen once, after the last micro-batch: `no_sync()` must cover the
    forward too, because DDP decides at forward time whether the coming backward synchronises (the
    CodeParrot scripts wrapped only the backward, and so all-reduced on every micro-step).

    `sequence_weights(batch)` ([B] weights, e.g. the course's key-token weights) turns each loss into the
    weighted mean of per-sequence losses; every micro-batch has B sequences, so dividing by k stays exact.
    """
    k = len(micro_batches)
    ddp = unwrap_ddp(model)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, batch in enumerate(micro_batches):
        with ddp.no_sync() if ddp is not None and i < k - 1 else nullcontext():
            with autocast:
                # labels = the inputs themselves: the model shifts them inside (position t is scored on
                # token t+1), as GPT2LMHeadModel does, so no shifted copy of the batch is ever made.
                # Only a weighted loss passes weights, so any model with GPT2LMHeadModel's call works.
                extra = {} if sequence_weights is None else {"sequence_weights": sequence_weights(batch)}
                _, loss = model(batch, labels=batch, **extra)
            scaler.scale(loss / k).backward()
        total += loss.detach().float()
    return total / k


def batch_hash_weights(seq_length: int, device: torch.device) -> torch.Tensor:
    """Fixed random int64 weights (the same in every run and on every device) for `batch_hashes`."""
    g = torch.Generator().manual_seed(20240731)
    return torch.randint(1, 2**62, (seq_length,), generator=g, dtype=torch.int64).to(device)


def batch_hashes(batch: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The sum over the batch's sequences of a 32-bit hash of each, on the device (no host wait).

    A sum of per-sequence hashes depends only on the multiset of sequences, not on how they were spread
    over ranks and micro-batches, so `batch_hash` in metrics.jsonl compares two runs step by step even
    when they ran on different numbers of GPUs. The per-sequence hash is a weighted sum of token ids in
    int64, which wraps around modulo 2**64 identically on every device and in any summation order.
    """
    per_sequence = (batch.long() * weights[:batch.size(1)]).sum(dim=1) & 0xFFFFFFFF
    return per_sequence.sum()


def skip_bad_step(run: Run, stats: dict) -> None:
    """A non-finite loss: the update was skipped; stop with one line after `max_bad_steps` of them."""
    run.bad_steps += 1
    if run.bad_steps > run.cfg.max_bad_steps:
        raise NonFiniteLossError(
            f"loss is {stats['loss']} at step {run.step + 1}; lower --learning-rate or use "
            "--mixed-precision bf16, then --resume-from-checkpoint latest (or --max-bad-steps N)")
    log.warning("loss is %s at step %d: skipped that step (%d of %d allowed)", stats["loss"],
                run.step + 1, run.bad_steps, run.cfg.max_bad_steps)


def step_metrics(run: Run, stats: dict) -> dict:
    """What one step logs: loss, LR, grad norm, throughput, input wait, samples seen, MFU on a known GPU."""
    cfg, world = run.cfg, run.dist_info.world_size
    tokens_per_s = tokens_per_step(run) / stats["seconds"]
    metrics = {"loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
               "tokens_per_s": tokens_per_s, "data_wait_s": stats["data_wait_s"], "step_s": stats["seconds"],
               "samples": run.step * cfg.train_batch_size * cfg.gradient_accumulation_steps * world,
               "batch_hash": stats["batch_hash"]}
    if run.peak_flops:
        metrics["mfu"] = run.flops_per_token * tokens_per_s / (run.peak_flops * world)
    return metrics


def tokens_per_step(run: Run) -> int:
    c = run.cfg
    return c.train_batch_size * c.gradient_accumulation_steps * run.dist_info.world_size * c.seq_length


# --- evaluation and checkpoints --------------------------------------------------------------------------
def evaluate(run: Run) -> dict:
    """Validation loss and perplexity over this rank's share of the validation set, summed over ranks."""
    cfg, dist_info = run.cfg, run.dist_info
    loader = build_valid_loader(
        cfg.dataset_name_valid, run.tokenizer, seq_length=cfg.seq_length, batch_size=cfg.valid_batch_size,
        tokenized=cfg.tokenized, rank=dist_info.rank, world_size=dist_info.world_size,
        num_workers=cfg.data_workers, device=dist_info.device, packing=cfg.packing)
    # The unwrapped model: DDP's forward would prepare a gradient all-reduce that never comes, and every
    # rank holds the same weights anyway. The plain mean token loss, also with --keytoken-loss (as the
    # course evaluates), so runs with and without it compare. Ranks may get different numbers of batches;
    # evaluate_loss sums loss and token counts over ranks, so the result is the exact mean over all
    # validation tokens.
    with loader:
        result = evaluate_loss(run.raw_model, loader, cfg.max_eval_steps, run.autocast)
    log.info("step %d: eval loss %.4f, perplexity %.2f", run.step, result["loss"], result["perplexity"])
    return {"eval_loss": result["loss"], "perplexity": result["perplexity"]}


def save(run: Run) -> None:
    """Checkpoint step_N/ (collective: every rank writes its own RNG and data state)."""
    rank_state = {"rng": rng_state(), "data": run.train_data.state_dict()}
    path = write_checkpoint(Path(run.cfg.output_dir), run.step, run.raw_model, run.optimizer, run.scheduler,
                            run.scaler, rank_state,
                            {"args": config_dict(run.cfg), "data_layout": run.layout.to_dict()},
                            run.cfg.keep_last, run.dist_info.rank, run.dist_info.world_size)
    log.info("saved checkpoint %s", path)
    if run.pusher is not None:
        push_to_hub(run)


def push_to_hub(run: Run) -> None:
    """Rank 0 writes the Hugging Face layout (model, tokenizer, metrics so far) into OUTPUT_DIR/hub and
    hands it to the pusher, which copies it and uploads it as "step N" beside training."""
    folder = Path(run.cfg.output_dir) / "hub"
    folder.mkdir(exist_ok=True)
    run.raw_model.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    metrics = Path(run.cfg.output_dir) / "metrics.jsonl"
    if metrics.exists():
        shutil.copyfile(metrics, folder / "metrics.jsonl")
    run.pusher.push(run.step, folder)
    run.pushed_step = run.step


def save_final_model(run: Run, result: dict) -> None:
    """Rank 0 writes the model and tokenizer in the Hugging Face layout; the others wait for the files."""
    if run.dist_info.is_main:
        run.raw_model.save_pretrained(run.cfg.output_dir)
        run.tokenizer.save_pretrained(run.cfg.output_dir)
        log.info("saved the final model and tokenizer to %s", run.cfg.output_dir)
        run.metrics.close({k: v for k, v in config_dict(run.cfg).items() if v is not None},
                          {"eval_loss": result["eval_loss"]})
        if run.pusher is not None and run.pushed_step != run.step:  # resumed at the end: never pushed
            push_to_hub(run)
    barrier()  # the other ranks wait for rank 0's files, so "the run ended" means they are complete


# --- set-up ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run holds, built by `set_up`."""

    cfg: TrainConfig
    dist_info: DistInfo
    tokenizer: Any
    raw_model: nn.Module  # the GPT itself: checkpoints, evaluation, FLOP counts
    model: nn.Module  # what the step runs: raw_model inside DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Any
    train_data: Any  # the train loader: iterate it for batches; state_dict() is the data position
    batches: Iterator[torch.Tensor]  # the loader's iterator, the one the steps draw from
    metrics: MetricsLog
    stop: StopRequest
    stop_flag: torch.Tensor  # on the device, refilled each step (see optimizer_step)
    flops_per_token: float
    peak_flops: float | None
    layout: DataLayout  # how the data is divided into streams; fixed for the whole run (data/streams.py)
    hash_weights: torch.Tensor  # for batch_hash (see batch_hashes)
    step: int = 0  # optimizer updates taken (skipped non-finite steps do not count)
    bad_steps: int = 0
    sequence_weights: Callable[[torch.Tensor], torch.Tensor] | None = None  # --keytoken-loss
    pusher: Any = None  # rank 0's HubPusher with --push-to-hub
    pushed_step: int | None = None


def set_up(cfg: TrainConfig, dist_info: DistInfo, notes: list[str] = (), warmup_typed: bool = False) -> Run:
    """Build the model, optimizer, schedule and data; resume from a checkpoint if asked to."""
    from minicodeparrot.tokenizer.bpe import Tokenizer

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(Path(cfg.log_dir), dist_info.rank)
    log.info("world size %d, device %s", dist_info.world_size, dist_info.device)
    log.debug("config %s", json.dumps(config_dict(cfg)))
    for note in notes:
        log.info("%s", note)
    # fp32 matmuls (the parts autocast leaves in fp32) on TF32 tensor cores: 10-bit mantissas are plenty
    # for training and several times faster on A100/H100; CPU runs are unaffected.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    tokenizer = Tokenizer.from_pretrained(cfg.tokenizer)
    if cfg.tokenized:  # before anything is built: a mismatch is found in seconds, not at step 1
        for spec in (cfg.dataset_name_train, cfg.dataset_name_valid):
            check_token_shards(spec, len(tokenizer))
    checkpoint = resume_path(cfg)
    layout = data_layout(cfg, dist_info, checkpoint)  # on resume, this may change the accumulation
    if cfg.num_train_epochs is not None:  # the schedule's length comes from the data
        set_steps_from_epochs(cfg, layout, dist_info, tokenizer, warmup_typed)
    raw_model, optimizer = build_model_and_optimizer(cfg, dist_info, tokenizer)
    scheduler = make_scheduler(optimizer, cfg.num_warmup_steps, cfg.max_train_steps, cfg.lr_scheduler_type)
    # bf16 keeps fp32's exponent range, so gradients cannot underflow and need no scaling; fp16 does,
    # hence the GradScaler (disabled, and a no-op, unless --mixed-precision fp16).
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=cfg.mixed_precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    train_data = build_train_loader(
        cfg.dataset_name_train, tokenizer, layout, seq_length=cfg.seq_length, seed=cfg.seed,
        micro_batch=cfg.train_batch_size, tokenized=cfg.tokenized, rank=dist_info.rank,
        world_size=dist_info.world_size, num_workers=cfg.data_workers, prefetch=cfg.prefetch,
        device=dist_info.device, packing=cfg.packing)
    step = resume(checkpoint, dist_info, raw_model, optimizer, scheduler, scaler, train_data)
    run = Run(
        cfg=cfg, dist_info=dist_info, tokenizer=tokenizer, raw_model=raw_model,
        model=wrap_model(raw_model, dist_info, cfg.compile), optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, autocast=torch.autocast(dist_info.device.type, dtype=amp_dtype,
                                               enabled=amp_dtype is not None),
        train_data=train_data, batches=first_batch_logged(iter(train_data)),
        metrics=MetricsLog(cfg, dist_info, step), stop=StopRequest(),
        stop_flag=torch.zeros((), device=dist_info.device),
        flops_per_token=raw_model.estimate_flops_per_token(cfg.seq_length),
        peak_flops=peak_flops(dist_info.device), layout=layout,
        hash_weights=batch_hash_weights(cfg.seq_length, dist_info.device), step=step,
        sequence_weights=keytoken_weighting(cfg, tokenizer, dist_info.device))
    if cfg.push_to_hub and dist_info.is_main:  # one uploader: the files are rank 0's
        from minicodeparrot.training.hub_push import HubPusher

        run.pusher = HubPusher(cfg.push_to_hub, output_dir / "hub_staging", private=cfg.hub_private)
    if dist_info.is_main:
        (output_dir / "train_args.json").write_text(json.dumps(config_dict(cfg), indent=2) + "\n")
        (output_dir / "environment.json").write_text(json.dumps(environment(dist_info), indent=2) + "\n")
        log.info("model: %.1fM parameters, %.3g FLOPs/token; %d tokens per optimizer step",
                 raw_model.num_parameters() / 1e6, run.flops_per_token, tokens_per_step(run))
    return run


def keytoken_weighting(cfg: TrainConfig, tokenizer, device: torch.device) -> Callable | None:
    """With --keytoken-loss: batch -> [B] weights alpha * (1 + key tokens in each sequence)."""
    if not cfg.keytoken_loss:
        return None
    from minicodeparrot.model.gpt import keytoken_ids, keytoken_weights

    words = [w.strip() for w in cfg.keytokens.split(",") if w.strip()]
    ids = keytoken_ids(tokenizer, words)
    if not ids:
        raise UserError(f"none of --keytokens {cfg.keytokens!r} is a single token of this tokenizer, with or "
                        "without a leading space; name words it has as one token")
    log.info("key-token loss: alpha %g, key tokens %s", cfg.keytoken_alpha,
             ", ".join(repr(tokenizer.decode([i])) for i in ids))
    return partial(keytoken_weights, key_ids=torch.tensor(ids, device=device), alpha=cfg.keytoken_alpha)


def set_steps_from_epochs(cfg: TrainConfig, layout: DataLayout, dist_info: DistInfo, tokenizer,
                          warmup_typed: bool) -> None:
    """--max-train-steps from --num-train-epochs; a preset's warmup shrinks with a short run, as when the
    steps are typed (config.resolve_config)."""
    cfg.max_train_steps = steps_from_epochs(cfg, layout, dist_info, tokenizer)
    notes: list[str] = []
    shorten_warmup(cfg, warmup_typed, notes)
    check_config(cfg)
    for note in notes:
        log.info("%s", note)


def steps_from_epochs(cfg: TrainConfig, layout: DataLayout, dist_info: DistInfo, tokenizer) -> int:
    """--num-train-epochs as optimizer steps: the sequences of one epoch over the global batch (full steps
    only, as the training batches run on into the next epoch without a short batch)."""
    per_epoch = sequences_per_epoch(cfg, layout, dist_info, tokenizer)
    per_step = layout.global_batch
    if per_epoch < per_step:
        raise UserError(f"one epoch of the training data is {per_epoch} sequences, fewer than the "
                        f"{per_step} of one optimizer step; use more data or a smaller batch")
    steps = per_epoch // per_step * cfg.num_train_epochs
    log.info("%d epoch(s) of %d sequences, %d per step: %d optimizer steps", cfg.num_train_epochs,
             per_epoch, per_step, steps)
    return steps


def sequences_per_epoch(cfg: TrainConfig, layout: DataLayout, dist_info: DistInfo, tokenizer) -> int:
    """Sequences per epoch: from the token shards' headers, or one counting pass over the files
    (tokenizing them all once, reported in the log; per-file counts are exact, concat ones to within the
    buffers' dropped tails). A Hub dataset is streamed: its size is not known before reading it all."""
    from tqdm.auto import tqdm

    from minicodeparrot.data.packing import ConstantLengthDataset
    from minicodeparrot.data.pretokenize import TokenShardDataset
    from minicodeparrot.sources.shards import ShardStream, resolve_sources

    if cfg.tokenized:  # each of the S streams takes windows // S per epoch
        windows = TokenShardDataset(cfg.dataset_name_train, seq_length=cfg.seq_length).num_windows
        return windows // layout.streams * layout.streams
    if any(source.repo_id for source in resolve_sources(cfg.dataset_name_train)):
        raise UserError("--num-train-epochs needs the data's size, which a streamed Hub dataset does not "
                        "give; download and `pretokenize` it, or give --max-train-steps")
    start = time.perf_counter()
    stream = ShardStream(cfg.dataset_name_train, split_by_rank=False, shuffle_files=False)
    packed = ConstantLengthDataset(tokenizer, stream, seq_length=cfg.seq_length, packing=cfg.packing)
    bar = tqdm(packed, desc="counting sequences", unit="seq",
               disable=not (cfg.progress and dist_info.is_main))
    total = sum(1 for _ in bar)
    log.info("counted %d sequences of %d tokens (%s packing) in the training data in %.1f s", total,
             cfg.seq_length, cfg.packing, time.perf_counter() - start)
    return total


def build_model_and_optimizer(cfg: TrainConfig, dist_info: DistInfo, tokenizer) -> tuple[nn.Module, Any]:
    """The seeded model, on its device, and AdamW (or ZeRO-1) over its parameters."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    # On a GPU the vocabulary is padded to a multiple of 64: the output projection's matmul then maps onto
    # whole tensor-core tiles (32768 already is one; GPT-2's 50257 is not).
    pad_vocab = 64 if dist_info.device.type == "cuda" else 1
    options = dict(scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
                   reorder_and_upcast_attn=cfg.reorder_and_upcast_attn)
    raw_model = build_model(cfg.model_config, len(tokenizer), cfg.seq_length, tokenizer.eos_token_id,
                            pad_vocab=pad_vocab, model_options=options)
    raw_model.gradient_checkpointing = cfg.gradient_checkpointing
    # On the device before the optimizer exists: fused AdamW and ZeRO's partitions take the parameters'
    # device as it is when they are built.
    raw_model.to(dist_info.device)
    torch.manual_seed(cfg.seed + dist_info.rank)  # but different dropout masks per rank
    if cfg.zero and dist_info.world_size == 1:
        log.info("--zero has nothing to shard in a single process: plain AdamW")
    optimizer = make_optimizer(raw_model, cfg.learning_rate, cfg.weight_decay,
                               fused=dist_info.device.type == "cuda", zero=cfg.zero)
    return raw_model, optimizer


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint `--resume-from-checkpoint` names (None: start from step 0)."""
    if not cfg.resume_from_checkpoint:
        return None
    path = resolve_resume(cfg.resume_from_checkpoint, Path(cfg.output_dir))
    if path is None:
        log.info("no checkpoint in %s yet: starting from step 0", cfg.output_dir)
    return path


def data_layout(cfg: TrainConfig, dist_info: DistInfo, checkpoint: Path | None) -> DataLayout:
    """The run's data streams and global batch: new for a new run, the checkpoint's when resuming.

    The global batch is part of the run: on resume with another number of ranks (or micro-batch) the
    gradient accumulation is derived from it, so every optimizer step still averages the same sequences.
    """
    world, b = dist_info.world_size, cfg.train_batch_size
    if checkpoint is None:
        layout = new_layout(b * cfg.gradient_accumulation_steps * world, world, cfg.data_streams,
                            cfg.record_shuffle_buffer, cfg.sequence_shuffle_buffer)
    else:
        saved = read_trainer_state(checkpoint)["meta"].get("data_layout")
        if saved is None:
            raise UserError(f"{checkpoint}: {stateless_checkpoint_message()}")
        layout = DataLayout(**saved)
    k = accumulation_steps(layout, world, b)
    if k != cfg.gradient_accumulation_steps:
        log.info("gradient accumulation %d (not %d): %d ranks x %d micro-batches x %d sequences = the run's "
                 "global batch of %d", k, cfg.gradient_accumulation_steps, world, k, b, layout.global_batch)
        cfg.gradient_accumulation_steps = k
    return layout


def resume(path: Path | None, dist_info: DistInfo, raw_model, optimizer, scheduler, scaler,
           train_data) -> int:
    """Load checkpoint `path`, if any, on this rank; returns the step to continue from."""
    if path is None:
        return 0
    state = load_checkpoint(path, raw_model, optimizer, scheduler, scaler, dist_info.rank,
                            dist_info.world_size, streams=train_data.streams)
    train_data.load_state_dict(state["data"])
    # Last: building the model and the data above drew random numbers; the restored generators must
    # continue exactly where the interrupted run's stood after its checkpoint.
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def environment(dist_info: DistInfo) -> dict:
    """What produced this run: the code's git commit, package versions, torch/CUDA, the devices.

    Two runs that disagree can then be told apart by their environment.json before anyone reads code.
    """
    import importlib.metadata
    import platform
    import subprocess

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "git_commit": commit, "python": platform.python_version(), "platform": platform.platform(),
        "packages": {n: version(n) for n in ("minicodeparrot", "torch", "numpy", "regex", "requests", "tqdm",
                                             "tensorboard")},
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda
        else [platform.processor() or platform.machine()],
        "world_size": dist_info.world_size,
    }


# --- building blocks -------------------------------------------------------------------------------------
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


def unwrap_ddp(model: nn.Module) -> DDP | None:
    """The DDP module inside a torch.compile wrapper (or the model itself), or None without DDP."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DDP) else None


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


# --- logging, signals ------------------------------------------------------------------------------------
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

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, start_step: int) -> None:
        self.writer = self.file = self.bar = None
        self.data_wait = self.wall = 0.0
        if not dist_info.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(cfg.log_dir) / "tensorboard"))
        self.file = open(Path(cfg.output_dir) / "metrics.jsonl", "a")  # noqa: SIM115 -- closed in close()
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_train_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def log_metrics(self, step: int, metrics: dict) -> None:
        log.debug("step %d %s", step, " ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if key != "batch_hash":  # an identity, not a quantity to plot
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


def first_batch_logged(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches, after writing the first one's checksum to the debug log (one wait for the device, once
    per run): two ranks with the same checksum would be training on the same data."""
    batch = next(batches)
    log.debug("first batch of this run: first sequence sums to %d", int(batch[0].sum()))
    yield batch
    yield from batches
