#!/bin/bash
# run v17 = v16's step-200 memory (passkey exact 58/67/67 % at 1k/2k/4k, window 64; perplexity of positions
# 512-2047 15.38, a little worse than v15's 15.05) trained on recall samples up to 4k tokens (1.5-4k: the needle
# up to ~3,900 tokens behind the question, the distances of the 4k passkey) and on text samples of 1-2k tokens,
# so that the positions 1,024-2,047 the perplexity target scores are trained on text for the first time (v16's
# text stopped at 1,024). A fresh optimizer, lr 1e-3, 60 steps (~2.2k tokens a step; session 15 started it with 100
# and resumed at step 40 with 60, so that the lr decays over steps 48-60 within the session: the same schedule
# up to step 40). Held-out prompts as v15.
# usage: docs/distill/recall/v17/run.sh [OVERRIDE ...] [--resume]   (THREADS=N, default 1); COMMAND=adapter as v5
here=$(dirname "$0")
# start from v16's fp32 step-200 adapter; where out/ is gone, its bf16 copy committed beside v16's run
init=out/recall-v16/adapter-step-000200; [ -f $init/adapter.safetensors ] || init=docs/distill/recall/v16/adapter-step-000200
tasks="{source: tasks, count: 300, lengths: [1536, 4096], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: facts}"
text="{source: text, count: 300, lengths: [1024, 2048], sources: [pydoc, essays, code]}"
exec "$here/../v9/run.sh" train.output_dir=out/recall-v17 train.init_adapter=$init \
  "data=[$tasks, $text]" train.lambda_transfer=0.3 train.steps=60 train.lr=1e-3 train.save_total_limit=3 "$@"
