#!/usr/bin/env bash
# codeparrot-small (111M) on one node with 8 GPUs: the book's recipe (12 x 16 GPUs) becomes 12 x 8 x 2 accumulation,
# so the global batch stays 192 sequences of 1024 tokens. Data: shards written by `minicodeparrot preprocess`
# (or a Hub dataset: codeparrot/codeparrot-clean-train), tokenizer from `minicodeparrot train-tokenizer`.
# Preempted (SIGTERM)? Re-run the same command: --resume-from-checkpoint latest continues exactly.
# A trainer that dies (a crash, SIGKILL) makes torchrun restart all of them, up to MAX_RESTARTS times; the new
# group resumes from the newest complete checkpoint, so a restart costs at most --save-checkpoint-steps steps.
set -euo pipefail
DATA=${DATA:-data/clean}
OUT=${OUT:-runs/codeparrot-small}
MAX_RESTARTS=${MAX_RESTARTS:-3}

torchrun --standalone --nproc_per_node=8 --max-restarts="$MAX_RESTARTS" -m minicodeparrot train \
  --preset codeparrot-small \
  --tokenizer tokenizer/codeparrot \
  --dataset-name-train "$DATA/train" \
  --dataset-name-valid "$DATA/valid" \
  --gradient-accumulation-steps 2 \
  --output-dir "$OUT" \
  --resume-from-checkpoint latest \
  --compile \
  "$@"
