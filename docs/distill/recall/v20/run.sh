#!/bin/bash
# run v20 = v19's data recipe (v16's recall samples of 1-2k tokens, v17's text of 1-2k) on 60 new samples
# (train.seed 1; v19's 60 steps drew 60 of its 600 samples with seed 0) from v19's step-60 memory, the shipped
# smollm2-allmem-recall since session 17: do more steps of the same data keep adding margin and perplexity?
# A fresh optimizer, lr 1e-3, 60 steps. Its in-training held-out probe draws other prompts than v19's (the seed
# sets them too): compare runs with `heldout.sh v20 60`. Checkpoints every 10 steps: stop and `--resume`.
# usage: docs/distill/recall/v20/run.sh [OVERRIDE ...] [--resume]   (THREADS=N, default 1); COMMAND=adapter as v5
here=$(dirname "$0")
# v19's fp32 step-60 adapter; where out/ is gone, its bf16 copy shipped in the package
init=out/recall-v19/adapter-step-000060; [ -f $init/adapter.safetensors ] || init=src/allmem/adapters/smollm2-allmem-recall
exec "$here/../v19/run.sh" train.output_dir=out/recall-v20 train.init_adapter=$init train.seed=1 "$@"
