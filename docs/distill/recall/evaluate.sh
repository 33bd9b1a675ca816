#!/bin/bash
# Evaluate one checkpoint of a recall run (v9 and later) beside full attention and SWA + sinks (same window and sinks):
#   1. its adapter (allmem adapter), 2. the addressing / gate-ratio / change-agreement table
#   (benchmarks/memory_addressing.py), 3. passkey retrieval beyond the window with the recall margin
#   (allmem eval synthetic; held-out haystacks, needle depths 0.1-0.5 so the needle is always > W back).
# usage: docs/distill/recall/evaluate.sh RUN STEP [LENGTH ...]   e.g. v10 600   (THREADS=N, default 1; lengths default 1024)
set -euo pipefail
cd "$(dirname "$0")/../../.."
run=$1
step=$(printf "step-%06d" "$2"); shift 2
lengths=${*:-1024}
here=docs/distill/recall/$run
out=out/recall-$run
COMMAND=adapter $here/run.sh --checkpoint $out/checkpoints/$step --out $out/adapter-$step
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
.venv/bin/python benchmarks/memory_addressing.py --key-init query --set output_init=attention centre=true \
  --weights $out/adapter-$step/adapter.safetensors --out $here/addressing-$step.md
.venv/bin/allmem eval synthetic --quiet --systems full:smollm2 "swa:smollm2?window=64&sinks=4" "allmem:$out/adapter-$step" \
  --tasks passkey --lengths $lengths --depths 0.1 0.3 0.5 --samples 4 --split heldout --margin --out $out/eval-$step
cp $out/eval-$step/summary.md $here/passkey-$step.md
