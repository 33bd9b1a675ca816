#!/bin/bash
# run v8 = v7 (v5's data and order, key_init query) with an output path that copies (output_init attention:
# the memory's o_proj = the attention's o_proj summed over each key/value group) and 10x the learning rate
# on the write gates (train.eta_lr_mult): a fact survives 550 later tokens only if the filler writes far
# less than the fact (benchmarks/needle_retention.py), and the gates start uniform.
# usage: docs/distill/recall/v8/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
exec "$(dirname "$0")/../v5/run.sh" train.output_dir=out/recall-v8 allmem.key_init=query allmem.output_init=attention \
  train.eta_lr_mult=10 train.steps=1200 "$@"
