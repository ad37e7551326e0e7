#!/usr/bin/env bash
# One command for the first GPU machine: scripts/gpu_check.py writes OUT_DIR/gpu_check.json, gpu_check.md and
# gpu_check_logs.tgz (default ./gpu_check_out).
#
#   bash scripts/gpu_check.sh [OUT_DIR]                       # a CUDA machine: at most 8 minutes
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh [OUT_DIR]     # CPU, tiny shapes: checks the script (CI)
#
# Nothing is installed: the GPU machine has torch (a CUDA build), numpy, transformers, regex, requests, tqdm and
# tensorboard, and no package registry, so the repository goes on PYTHONPATH instead of `pip install -e .`.
set -euo pipefail
OUT="${1:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py --out "$OUT"
