"""Validation loss and perplexity: the number the training loop reports at every checkpoint.

Validation loss is the mean next-token cross-entropy over the packed (ConstantLengthDataset)
blocks of a validation split; perplexity = exp(loss). Under torchrun every rank reads its own part
of the data and the per-rank loss *sums and token counts* are all-reduced, so the result is the
exact token mean no matter how unevenly the data splits (averaging per-rank means would not be).
`minicodeparrot evaluate-loss` (evaluation/loss.py) runs the same function on a saved model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch

from minicodeparrot.dist import all_reduce_sum, rank_and_world
from minicodeparrot.errors import UserError


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
