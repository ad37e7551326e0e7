"""Validation loss and perplexity of a model: the number the training loop reports, and a command for it.

Validation loss is the mean next-token cross-entropy over the packed (ConstantLengthDataset)
blocks of a validation split; perplexity = exp(loss). Under torchrun every rank reads its own part
of the data and the per-rank loss *sums and token counts* are all-reduced, so the result is the
exact token mean no matter how unevenly the data splits (averaging per-rank means would not be).
HumanEval pass@k is in humaneval.py.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch

from minicodeparrot.dist import all_reduce_sum, rank_and_world, setup_distributed, teardown_distributed
from minicodeparrot.errors import UserError


# --- validation loss ---------------------------------------------------------------------------
def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows (an untrained or diverged model)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[torch.Tensor], max_eval_steps: int = -1, autocast=None) -> dict:
    """Token-mean loss over `batches` of input ids (labels = inputs, shifted inside the model).

    Sums, not means, are accumulated and all-reduced, so a smaller last batch or a rank with less
    data weighs exactly by its token count (averaging rank 0's batches alone would not be the
    validation loss). `max_eval_steps` < 0 means the whole split. The training loop calls this too,
    with its mixed-precision `autocast` context.
    """
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, predicted tokens, batches
    for step, batch in enumerate(batches):
        if 0 <= max_eval_steps <= step:
            break
        batch = batch.to(device)
        with autocast or nullcontext():
            _, loss = model(batch, labels=batch)
        n_predicted = batch.size(0) * (batch.size(1) - 1)
        totals[0] += loss.double() * n_predicted
        totals[1] += n_predicted
        totals[2] += 1
    all_reduce_sum(totals)
    model.train(was_training)
    loss_sum, tokens, steps = totals.tolist()
    if tokens == 0:
        raise UserError("the evaluation data gave no full sequence on any rank; use more validation data "
                        "or a smaller --seq-length")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens), "batches": int(steps),
            "world_size": world}


def evaluate_loss_command(args: argparse.Namespace) -> None:
    """`minicodeparrot evaluate-loss`: the validation loss and perplexity exactly as `train` reports them.

    The batches come from the same builder that `train` uses (`loader.build_valid_loader`): the same
    packing, the same choice of validation shards, `--tokenized` shards too. Rank 0 prints (and with
    --output writes) the result; the counts of bad records and of tokens dropped by packing are rank 0's
    own, named so (known only when its share was read to the end, i.e. without --max-eval-steps).
    """
    from tqdm import tqdm

    from minicodeparrot.data import validation_sources
    from minicodeparrot.loader import build_valid_loader
    from minicodeparrot.model import GPT
    from minicodeparrot.tokenizer import Tokenizer

    if args.batch_size < 1 or args.data_workers < 0:
        raise UserError("--batch-size must be >= 1 and --data-workers >= 0")
    dist_info = setup_distributed()
    model = GPT.from_pretrained(args.model).to(dist_info.device)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    seq_length = args.seq_length or model.config.n_positions
    if not 2 <= seq_length <= model.config.n_positions:
        raise UserError(f"--seq-length must be in 2..{model.config.n_positions} (the model's n_positions)")
    if dist_info.is_main and not args.tokenized:
        sources = validation_sources(args.dataset)
        print(f"evaluating on {len(sources)} file(s): {', '.join(s.name for s in sources[:3])}"
              + (" ..." if len(sources) > 3 else ""))
    loader = build_valid_loader(
        args.dataset, tokenizer, seq_length=seq_length, batch_size=args.batch_size, tokenized=args.tokenized,
        rank=dist_info.rank, world_size=dist_info.world_size, text_field=args.text_field,
        num_workers=args.data_workers, device=dist_info.device)
    total = args.max_eval_steps if args.max_eval_steps >= 0 else None
    with loader:
        bar = tqdm(loader, total=total, desc="evaluating", unit="batch",
                   disable=args.no_progress or not dist_info.is_main)
        result = evaluate_loss(model, bar, max_eval_steps=args.max_eval_steps)
    bad, dropped = loader.stats.get("bad_records"), loader.stats.get("tokens_dropped")
    result.update(model=str(args.model), seq_length=seq_length, batch_size=args.batch_size,
                  bad_records_rank0=bad, tokens_dropped_rank0=dropped)
    if dist_info.is_main:
        skipped = f"{bad} bad records skipped on rank 0" if bad is not None else "stopped at --max-eval-steps"
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.4f}  "
              f"({result['tokens']:,} predicted tokens, {result['batches']} batches, "
              f"{dist_info.world_size} rank(s); {skipped})")
        print(json.dumps(result))
        if args.output:
            with open(args.output, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
    teardown_distributed()
