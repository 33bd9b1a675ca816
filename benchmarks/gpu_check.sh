#!/usr/bin/env bash
# One short GPU run: correctness against the CPU float64 reference, then prefill/decode
# timings at 8k-128k on Qwen3-0.6B-sized random weights. A few minutes on one H100.
#   bash benchmarks/gpu_check.sh [--lengths 8192 32768 131072]
# Needs a CUDA build of torch (pip install torch) and this package (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu "$@"
