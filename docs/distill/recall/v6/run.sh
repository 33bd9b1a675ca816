#!/bin/bash
# run v6 = v5 (docs/distill/recall/v5/run.sh) with a mixture of sample lengths, as MQAR's mixture
# (docs/mqar, session 5) made 512:32 learn where 512:32 alone stayed at chance: half of the recall
# samples are 160-320 tokens (fact 64-320 tokens back), half 384-768. Branches from v5's step-120
# checkpoint (copied into out/recall-v6/checkpoints/ before the first --resume).
# usage: docs/distill/recall/v6/run.sh [OVERRIDE ...] --resume      (THREADS=N, default 1)
cd /work/main
exec nice -n 5 env OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} .venv/bin/allmem distill --recipe smollm2-recall \
  train.output_dir=out/recall-v6 train.init_adapter=null \
  train.reset_control_heads=false allmem.read_residual=false allmem.qk_scale=1.0 allmem.base_lr=0.1 \
  allmem.momentum_init=0.9 allmem.conv_init=key_shift allmem.window=64 allmem.chunk=32 \
  "randomize={window: [32, 128], sinks: [2, 8], chunk: [16, 32]}" \
  "data=[{source: tasks, count: 300, lengths: [160, 320], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0}, {source: tasks, count: 300, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0}, {source: text, count: 200, lengths: [384, 768], sources: [pydoc, essays, code]}]" \
  "heldout=[{source: tasks, count: 3, lengths: [768, 768], tasks: [passkey, kv_retrieval, fact_recall]}, {source: text, count: 3, lengths: [768, 768], sources: [pydoc, essays, code]}]" \
  train.steps=1200 train.lr=2e-3 train.warmup_steps=20 train.save_every=10 train.eval_every=100 \
  train.recall_prompts=6 train.recall_length=768 "$@"
