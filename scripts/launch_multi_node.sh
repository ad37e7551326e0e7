#!/usr/bin/env bash
# codeparrot (1.5B, gpt2-xl) on 2 nodes x 8 GPUs = the book's 16 GPUs: batch 2 x 16 GPUs x 16 accumulation = 512.
# Run this script on every node with NODE_RANK=0..NNODES-1 and MASTER_ADDR = node 0's address; OUT must be on a
# filesystem all nodes share: every rank writes its own part of each checkpoint (its data position, RNG and,
# with --zero, which the preset turns on, its shard of the optimizer state) and reads it back on resume.
# Pretokenized shards (`minicodeparrot pretokenize`) keep the GPUs fed: --tokenized.
set -euo pipefail
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the index of this node}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-data/tokens}
OUT=${OUT:-runs/codeparrot}

torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node=8 \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m minicodeparrot train \
  --preset codeparrot \
  --tokenizer tokenizer/codeparrot \
  --tokenized \
  --dataset-name-train "$DATA/train" \
  --dataset-name-valid "$DATA/valid" \
  --output-dir "$OUT" \
  --resume-from-checkpoint latest \
  "$@"
