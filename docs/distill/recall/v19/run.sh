#!/bin/bash
# run v19 = v16's step-200 memory on v16's recall samples (1-2k tokens, the needle 700-1,900 tokens back) and
# v17's text (1-2k tokens). v17 (recall 1.5-4k, text 1-2k) won perplexity (positions 512-2047 15.38 -> 14.84)
# and lost recall (margin +27.5 -> +19); this run changes only the recall samples back to v16's, to tell
# whether the longer recall samples or the longer text cost the recall. A fresh optimizer, lr 1e-3, 60 steps;
# held-out prompts as v15. Checkpoints every 10 steps: stop and `--resume` across sessions.
# usage: docs/distill/recall/v19/run.sh [OVERRIDE ...] [--resume]   (THREADS=N, default 1); COMMAND=adapter as v5
here=$(dirname "$0")
tasks="{source: tasks, count: 300, lengths: [1024, 2048], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: facts}"
text="{source: text, count: 300, lengths: [1024, 2048], sources: [pydoc, essays, code]}"
exec "$here/../v17/run.sh" train.output_dir=out/recall-v19 "data=[$tasks, $text]" "$@"
