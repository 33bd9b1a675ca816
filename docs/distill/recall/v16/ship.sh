#!/bin/bash
# Ship run v16's step-200 adapter as `smollm2-allmem-recall` (scripts/ship_adapter.py), replacing v15: bf16
# weights, the recipe as the run resolved it (v5's, v9's and v16's overrides in that order), the card with the
# steps, tokens and hours of v14, v15 (read from the v15 card being replaced) and v16.
# The overrides are listed again here because a run does not save its resolved recipe; the result is committed as
# src/allmem/adapters/smollm2-allmem-recall/recipe.yaml, which is what to read.
# usage: docs/distill/recall/v16/ship.sh   (after docs/distill/recall/v16/run.sh finished in out/recall-v16)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
to=src/allmem/adapters/smollm2-allmem-recall
# the card being replaced is v15's: keep it aside so that its totals and recipe are read before they are overwritten
previous=$(mktemp -d); trap 'rm -rf "$previous"' EXIT
if grep -q '"command": "docs/distill/recall/v15/run.sh"' $to/training.json; then
  cp $to/training.json $to/recipe.yaml "$previous"/
else
  git show fa48d8f:$to/training.json > "$previous"/training.json
  git show fa48d8f:$to/recipe.yaml > "$previous"/recipe.yaml
fi
tasks="{source: tasks, count: 400, lengths: [1024, 2048], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: facts}"
text="{source: text, count: 400, lengths: [512, 1024], sources: [pydoc, essays, code]}"
.venv/bin/python scripts/ship_adapter.py --run out/recall-v16 --adapter out/recall-v16/adapter-step-000200 \
  --recipe smollm2-recall --set \
  train.init_adapter=null train.reset_control_heads=false allmem.read_residual=false allmem.qk_scale=1.0 \
  allmem.base_lr=0.1 allmem.momentum_init=0.9 allmem.conv_init=key_shift allmem.window=64 allmem.chunk=32 \
  "randomize={window: [32, 128], sinks: [2, 8], chunk: [16, 32]}" \
  "heldout=[{source: tasks, count: 3, lengths: [768, 768], tasks: [passkey, kv_retrieval, fact_recall]}, {source: text, count: 3, lengths: [768, 768], sources: [pydoc, essays, code]}]" \
  train.lr=2e-3 train.warmup_steps=20 train.save_every=10 train.eval_every=50 train.recall_prompts=6 train.recall_length=768 \
  allmem.key_init=query allmem.output_init=attention allmem.centre=true train.eta_lr_mult=10 train.lambda_gate=1.0 \
  train.gate_ratio=100 train.output_dir=out/recall-v16 train.init_adapter=out/recall-v15/adapter-step-000400 \
  "data=[$tasks, $text]" train.lambda_transfer=0.3 train.steps=200 train.lr=1e-3 train.save_total_limit=3 \
  --command "docs/distill/recall/v16/run.sh" --warm-start "$previous" \
  --about "SmolLM2-135M-Instruct with a memory that recalls past its window (recall-trained)" \
  --loss-png docs/distill/recall/v16/curves.png --to $to \
  --notes "$(cat docs/distill/recall/v16/card-notes.md)"
