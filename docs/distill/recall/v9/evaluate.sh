#!/bin/bash
# Evaluate one checkpoint of run v9 beside full attention and SWA + sinks (same window and sinks):
#   1. its adapter (allmem adapter), 2. the addressing / gate-ratio / change-agreement table
#   (benchmarks/memory_addressing.py), 3. passkey retrieval beyond the window with the recall margin
#   (allmem eval synthetic; held-out haystacks, needle depths 0.1-0.5 so the needle is always > W back).
# usage: docs/distill/recall/v9/evaluate.sh STEP [LENGTH ...]      (THREADS=N, default 1; lengths default 1024)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
step=$(printf "step-%06d" "$1"); shift
lengths=${*:-1024}
here=docs/distill/recall/v9
out=out/recall-v9
COMMAND=adapter $here/run.sh --checkpoint $out/checkpoints/$step --out $out/adapter-$step
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
.venv/bin/python benchmarks/memory_addressing.py --key-init query --set output_init=attention centre=true \
  --weights $out/adapter-$step/adapter.safetensors --out $here/addressing-$step.md
.venv/bin/allmem eval synthetic --quiet --systems full:smollm2 "swa:smollm2?window=64&sinks=4" "allmem:$out/adapter-$step" \
  --tasks passkey --lengths $lengths --depths 0.1 0.3 0.5 --samples 4 --split heldout --margin --out $out/eval-$step
cp $out/eval-$step/summary.md $here/passkey-$step.md
