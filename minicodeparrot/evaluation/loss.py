"""`minicodeparrot evaluate-loss`: the validation loss and perplexity of a saved model.

The number is computed by `training.validation.evaluate_loss`, the function the training loop calls,
on batches from the same builder `train` uses, so the two agree exactly. HumanEval pass@k is in
evaluation/humaneval.py.
"""

from __future__ import annotations

import argparse
import json

from minicodeparrot.dist import setup_distributed, teardown_distributed
from minicodeparrot.errors import UserError
from minicodeparrot.training.validation import evaluate_loss


def evaluate_loss_command(args: argparse.Namespace) -> None:
    """`minicodeparrot evaluate-loss`: the validation loss and perplexity exactly as `train` reports them.

    The batches come from the same builder that `train` uses (`loader.build_valid_loader`): the same
    packing, the same choice of validation shards, `--tokenized` shards too. Rank 0 prints (and with
    --output writes) the result; the counts of bad records and of tokens dropped by packing are rank 0's
    own, named so (known only when its share was read to the end, i.e. without --max-eval-steps).
    """
    from tqdm import tqdm

    from minicodeparrot.data.loader import build_valid_loader
    from minicodeparrot.data.pipeline import validation_sources
    from minicodeparrot.model.generate import inference_precision
    from minicodeparrot.model.gpt import GPT
    from minicodeparrot.tokenizer.bpe import Tokenizer

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
        num_workers=args.data_workers, device=dist_info.device, packing=args.packing)
    total = args.max_eval_steps if args.max_eval_steps >= 0 else None
    with loader:
        bar = tqdm(loader, total=total, desc="evaluating", unit="batch",
                   disable=args.no_progress or not dist_info.is_main)
        result = evaluate_loss(model, bar, max_eval_steps=args.max_eval_steps,
                               autocast=inference_precision(dist_info.device, args.fp32))
    bad, dropped = loader.stats.get("bad_records"), loader.stats.get("tokens_dropped")
    result.update(model=str(args.model), seq_length=seq_length, batch_size=args.batch_size,
                  packing=args.packing, bad_records_rank0=bad, tokens_dropped_rank0=dropped)
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
