#!/bin/bash
# run v9 = v8 (key_init query, output_init attention, 10x gate lr) + centred features + the write-gate loss:
# on every recall sample the eta heads are pushed to write the needle's tokens 100x more than the rest of the
# context (train.lambda_gate, train.gate_ratio). Runs v5-v8 left the gates uniform or writing the filler more,
# and a uniform gate lets the filler erase the needle within ~200 tokens (benchmarks/needle_retention.py).
# usage: docs/distill/recall/v9/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
exec "$(dirname "$0")/../v5/run.sh" train.output_dir=out/recall-v9 allmem.key_init=query allmem.output_init=attention \
  allmem.centre=true train.eta_lr_mult=10 train.lambda_gate=1.0 train.gate_ratio=100 train.steps=1200 "$@"
