#!/bin/bash
# run v12 = v11 + the needle-specific transfer loss (train.lambda_needle):
# warm-started from v11's step 610 (docs/distill/recall/v11/adapter-step-000610, bf16), whose layers 6-8
# match the full attention's output at the answer to 2-3 % but change with the code in the wrong direction
# (transfer_gap needle-specific 2.6 / 2.6 / 1.8; SWA + sinks 1.0). Each recall step also runs the sample
# with another code in its needle (no gradient) and fits every layer's change of output to the full
# attention's. Watch needle_error (metrics.jsonl) and the held-out margin; 600 steps, decaying from 480.
# Session 9 ran it to step 200 (margin +0.46; results in ../README.md); its step-200 adapter is kept here in
# bf16: continue with `v12/run.sh train.init_adapter=docs/distill/recall/v12/adapter-step-000200 train.steps=N`.
# usage: docs/distill/recall/v12/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
exec "$(dirname "$0")/../v9/run.sh" train.output_dir=out/recall-v12 \
  train.init_adapter=docs/distill/recall/v11/adapter-step-000610 train.lambda_transfer=1.0 train.lambda_needle=1.0 \
  train.steps=600 train.eval_every=100 "$@"
