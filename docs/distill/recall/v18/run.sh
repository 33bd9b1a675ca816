#!/bin/bash
# run v18 = run v17 with the answer-order loss (train.lambda_order=0.5, margin 2 nats): the same start (v16's
# step-200 memory), data (recall samples 1.5-4k tokens, text 1-2k), optimizer and 60 steps, so that the one
# difference is the loss. v17 lowered the perplexity of positions 512-2047 (15.38 -> 14.84) but lost recall
# (passkey exact 58/67/67 -> 75/50/58 % at 1k/2k/4k, margin +27.5 -> +19); the held-out misses of v16 and v17
# are mostly the answer's digits emitted out of order (the next digit ranked above the right one), which is
# what the order loss penalises on every scored answer token.
# usage: docs/distill/recall/v18/run.sh [OVERRIDE ...] [--resume]   (THREADS=N, default 1); COMMAND=adapter as v5
exec "$(dirname "$0")/../v17/run.sh" train.output_dir=out/recall-v18 train.lambda_order=0.5 "$@"
