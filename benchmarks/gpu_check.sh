#!/usr/bin/env bash
# One short GPU run: correctness against the CPU float64 reference, then prefill/decode
# timings at 8k-128k on Qwen3-0.6B-sized random weights. A few minutes on one H100.
#   bash benchmarks/gpu_check.sh [--lengths 8192 32768 131072]
# Needs a CUDA build of torch (pip install torch) and this package (pip install -e .).
# Serving (optional): with VLLM_PY=/path/to/python of an environment holding a CUDA build of vLLM
# and this package (pip install -e ".[serve]"), the vLLM plugin's greedy tokens are then compared
# with model.generate for prompts of 37 and 700 tokens (benchmarks/vllm_smoke.py, chunked prefill).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu "$@"
if [ -n "${VLLM_PY:-}" ]; then
  "$PY" benchmarks/vllm_smoke.py all --project-python "$PY" --vllm-python "$VLLM_PY" \
    --dir out/vllm-smoke-gpu 2>&1 | tee benchmarks/results/gpu/vllm_smoke.txt
else
  echo "serving step skipped: set VLLM_PY to the python of an environment with a CUDA build of vLLM"
fi
