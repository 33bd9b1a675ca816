#!/bin/bash
# run v15 = v14's step-1,500 memory (held-out recall margin +18.9, above full attention's +13.4; perplexity
# at positions 512-2k 18.40 against SWA + sinks' 16.17) warm-started with a smaller attention-transfer weight
# and three times the text: can the language model come back while the recall stays? Target: held-out
# perplexity at or below SWA + sinks' with the margin above +10. A fresh optimizer; 400 steps.
# Result (session 13): held-out ppl 12.81 (SWA 13.60), margin +13.5 (6/6); window 64, positions 512-2047 of 2k windows
# 15.05 (SWA 16.17, v14 18.40), passkey 1k margin +19.6, exact 25 %. Shipped as smollm2-allmem-recall (v15/ship.sh).
# usage: docs/distill/recall/v15/run.sh [OVERRIDE ...] [--resume]   (THREADS=N, default 1); COMMAND=adapter as v5
here=$(dirname "$0")
tasks="{source: tasks, count: 600, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: facts}"
text="{source: text, count: 600, lengths: [384, 768], sources: [pydoc, essays, code]}"
exec "$here/../v9/run.sh" train.output_dir=out/recall-v15 train.init_adapter=docs/distill/recall/v14/adapter-step-001500 \
  "data=[$tasks, $text]" train.lambda_transfer=0.3 train.steps=400 train.save_total_limit=3 "$@"
