#!/bin/bash
# run v11 = v10's settings (v9 + attention transfer) from a fresh memory: the write-gate loss and the
# attention transfer act from step 1 instead of after v9's 520 steps without transfer. Session 9 had to
# start over (v10's checkpoints did not survive the session), and this asks whether the transfer signal
# alone, from the start, gets the recall v10 got in 1,000 steps. 760 steps: the learning rate decays from
# step 608 (decay_fraction 0.2; first started as 800 steps, changed at step 90 to end in time), within one session at ~8 s per step on 2 cores.
# Stopped at step 610 (held-out margin +0.03): results in this folder and ../README.md (session 9); its
# step-610 adapter is kept here in bf16 (adapter-step-000610/) for v12 to warm-start from.
# usage: docs/distill/recall/v11/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
exec "$(dirname "$0")/../v9/run.sh" train.output_dir=out/recall-v11 train.lambda_transfer=1.0 train.steps=760 \
  train.eval_every=100 "$@"
