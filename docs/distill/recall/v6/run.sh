#!/bin/bash
# run v6 = v5 with a mixture of sample lengths, as MQAR's mixture (docs/mqar, session 5) made 512:32
# learn where 512:32 alone stayed at chance: half of the recall samples are 160-320 tokens (fact 64-320
# tokens back), half 384-768. Branches from v5's step-120 checkpoint (copied into
# out/recall-v6/checkpoints/ before the first --resume).
# usage: docs/distill/recall/v6/run.sh [OVERRIDE ...] --resume      (THREADS=N, default 1)
TASKS="tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0"
exec "$(dirname "$0")/../v5/run.sh" train.output_dir=out/recall-v6 train.steps=1200 train.eval_every=100 \
  "data=[{source: tasks, count: 300, lengths: [160, 320], $TASKS}, {source: tasks, count: 300, lengths: [384, 768], $TASKS}, {source: text, count: 200, lengths: [384, 768], sources: [pydoc, essays, code]}]" \
  "$@"
