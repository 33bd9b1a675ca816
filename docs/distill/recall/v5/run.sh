#!/bin/bash
# run v5 (COMMAND=adapter ... [--checkpoint DIR] writes an adapter of a checkpoint instead of training): v3's recall-heavy short-sample setup, with the key_shift conv start and the slow-forgetting write (qk_scale 1, base_lr 0.1, momentum 0.9) that made MQAR recall at 256:16
cd /work/main
exec nice -n 5 env OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} .venv/bin/allmem ${COMMAND:-distill} --recipe smollm2-recall \
  train.output_dir=out/recall-v5 train.init_adapter=null \
  train.reset_control_heads=false allmem.read_residual=false allmem.qk_scale=1.0 allmem.base_lr=0.1 \
  allmem.momentum_init=0.9 allmem.conv_init=key_shift allmem.window=64 allmem.chunk=32 \
  "randomize={window: [32, 128], sinks: [2, 8], chunk: [16, 32]}" \
  "data=[{source: tasks, count: 600, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0}, {source: text, count: 200, lengths: [384, 768], sources: [pydoc, essays, code]}]" \
  "heldout=[{source: tasks, count: 3, lengths: [768, 768], tasks: [passkey, kv_retrieval, fact_recall]}, {source: text, count: 3, lengths: [768, 768], sources: [pydoc, essays, code]}]" \
  train.steps=400 train.lr=2e-3 train.warmup_steps=20 train.save_every=10 train.eval_every=50 \
  train.recall_prompts=6 train.recall_length=768 "$@"
