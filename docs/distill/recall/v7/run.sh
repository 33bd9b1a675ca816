#!/bin/bash
# run v7 = v5 (docs/distill/recall/v5/run.sh: same data, same order, fresh memory) with key_init=query:
# the memory's keys start as a copy of its queries, so with key_shift the fresh memory is an induction
# copy (benchmarks/memory_addressing.py: the needle's key ranks 1st in most heads before training).
# usage: docs/distill/recall/v7/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
cd /work/main
exec nice -n 5 env OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} .venv/bin/allmem distill --recipe smollm2-recall \
  train.output_dir=out/recall-v7 train.init_adapter=null \
  train.reset_control_heads=false allmem.read_residual=false allmem.qk_scale=1.0 allmem.base_lr=0.1 \
  allmem.momentum_init=0.9 allmem.conv_init=key_shift allmem.key_init=query allmem.window=64 allmem.chunk=32 \
  "randomize={window: [32, 128], sinks: [2, 8], chunk: [16, 32]}" \
  "data=[{source: tasks, count: 600, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0}, {source: text, count: 200, lengths: [384, 768], sources: [pydoc, essays, code]}]" \
  "heldout=[{source: tasks, count: 3, lengths: [768, 768], tasks: [passkey, kv_retrieval, fact_recall]}, {source: text, count: 3, lengths: [768, 768], sources: [pydoc, essays, code]}]" \
  train.steps=1200 train.lr=2e-3 train.warmup_steps=20 train.save_every=10 train.eval_every=50 \
  train.recall_prompts=6 train.recall_length=768 "$@"
