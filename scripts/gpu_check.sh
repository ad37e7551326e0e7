#!/usr/bin/env bash
# One command for the first GPU machine (issue 12): install, then scripts/gpu_check.py writes
# OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (default ./gpu_check_out).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh [OUT_DIR]   # CPU, tiny shapes, no install: checks the script
#
# The install keeps the machine's torch (a CUDA build); only when there is none does it take pip's.
set -euo pipefail
OUT="${1:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ "${GPU_CHECK_SMOKE:-0}" != "1" ]]; then
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch
    # transformers is the reference the parity and throughput sections compare against.
    "$PY" -m pip install -q -e . transformers
fi
exec "$PY" scripts/gpu_check.py --out "$OUT"
