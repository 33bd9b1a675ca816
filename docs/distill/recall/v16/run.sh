#!/bin/bash
# run v16 = v15's step-400 memory (shipped as smollm2-allmem-recall; passkey exact at 1k 50 % in the demo, 0 at
# 2k and 4k) trained on recall samples two to three times longer (1-2k tokens, the needle 700-1,900 tokens
# behind the question) so that the memory is taught to keep a fact over the distances it is evaluated at.
# Text samples 512-1,024 tokens. A fresh optimizer, lr 1e-3, 200 steps. Held-out prompts as v15 (768 tokens).
# Result (session 14): held-out margin +18.96, ppl 12.93; window 64 passkey exact 58/67/67 % at 1k/2k/4k (v15 25/8/17).
# usage: docs/distill/recall/v16/run.sh [OVERRIDE ...] [--resume]   (THREADS=N, default 1); COMMAND=adapter as v5
here=$(dirname "$0")
# session 14 started from v15's fp32 step-400 adapter; where it is gone, the bf16 copy of it shipped in session 13
init=out/recall-v15/adapter-step-000400; [ -f $init/adapter.safetensors ] || init=$("$here/../v15/shipped.sh")
tasks="{source: tasks, count: 400, lengths: [1024, 2048], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: facts}"
text="{source: text, count: 400, lengths: [512, 1024], sources: [pydoc, essays, code]}"
exec "$here/../v9/run.sh" train.output_dir=out/recall-v16 train.init_adapter=$init \
  "data=[$tasks, $text]" train.lambda_transfer=0.3 train.steps=200 train.lr=1e-3 train.save_total_limit=3 "$@"
