#!/usr/bin/env bash
# codeparrot (1.5B, gpt2-xl) on 2 nodes x 8 GPUs = the book's 16 GPUs: batch 2 x 16 GPUs x 16 accumulation = 512.
# Run this script on every node with MASTER_ADDR = node 0's address and the same JOB_ID (the c10d rendezvous
# numbers the nodes). When a trainer dies, every node's torchrun restarts its workers (up to MAX_RESTARTS times)
# and the new group resumes from the newest complete checkpoint; a static rendezvous (--node_rank) would leave
# the other nodes' workers waiting on the dead one. OUT must be on a filesystem all nodes share: every rank
# writes its own part of each checkpoint (its data position, RNG and, with --zero, which the preset turns on,
# its shard of the optimizer state) and reads it back on resume.
# NNODES=1:2 (MIN:MAX) lets the job lose a node: the other node's workers fail on their next collective, its
# torchrun re-rendezvouses without the lost node (after about 15 s without a heartbeat, plus last_call_timeout,
# 30 s) and continues from the newest checkpoint with the same global batch of 512, accumulating 32 micro-
# batches instead of 16. A node that (re)joins makes the running ones checkpoint and restart with it. Node 0
# (MASTER_ADDR) hosts the rendezvous and must stay. README: Fault tolerance.
# Pretokenized shards (`minicodeparrot pretokenize`) keep the GPUs fed: --tokenized.
set -euo pipefail
NNODES=${NNODES:-2}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-codeparrot}
MAX_RESTARTS=${MAX_RESTARTS:-3}
DATA=${DATA:-data/tokens}
OUT=${OUT:-runs/codeparrot}
if [[ $NNODES == *:* ]]; then
  # torch 2.13: with the agent's store shared with the workers (the default), a node that joins a running job
  # waits in vain for rank 0's address; without sharing, rank 0 publishes a fresh one every round.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi

torchrun --nnodes="$NNODES" --nproc_per_node=8 --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_ID" \
  -m minicodeparrot train \
  --preset codeparrot \
  --tokenizer tokenizer/codeparrot \
  --tokenized \
  --dataset-name-train "$DATA/train" \
  --dataset-name-valid "$DATA/valid" \
  --output-dir "$OUT" \
  --resume-from-checkpoint latest \
  "$@"
