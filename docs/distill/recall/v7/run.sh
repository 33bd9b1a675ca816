#!/bin/bash
# run v7 = v5 (same data, same order, fresh memory) with key_init=query: the memory's keys start as a
# copy of its queries, so with key_shift the fresh memory is an induction copy
# (benchmarks/memory_addressing.py: the needle's key ranks 1st in most heads before training).
# usage: docs/distill/recall/v7/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
exec "$(dirname "$0")/../v5/run.sh" train.output_dir=out/recall-v7 allmem.key_init=query train.steps=1200 "$@"
