#!/bin/bash
# Ship run v15's final adapter as `smollm2-allmem-recall` (scripts/ship_adapter.py): bf16 weights, the recipe as the
# run resolved it (v5's, v9's and v15's overrides in that order), the card with v14's and v15's steps, tokens and hours.
# The overrides are listed again here because a run does not save its resolved recipe; the result is committed as
# src/allmem/adapters/smollm2-allmem-recall/recipe.yaml, which is what to read.
# usage: docs/distill/recall/v15/ship.sh   (after docs/distill/recall/v15/run.sh finished in out/recall-v15)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
tasks="{source: tasks, count: 600, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: facts}"
text="{source: text, count: 600, lengths: [384, 768], sources: [pydoc, essays, code]}"
.venv/bin/python scripts/ship_adapter.py --run out/recall-v15 --recipe smollm2-recall --set \
  train.init_adapter=null train.reset_control_heads=false allmem.read_residual=false allmem.qk_scale=1.0 \
  allmem.base_lr=0.1 allmem.momentum_init=0.9 allmem.conv_init=key_shift allmem.window=64 allmem.chunk=32 \
  "randomize={window: [32, 128], sinks: [2, 8], chunk: [16, 32]}" \
  "heldout=[{source: tasks, count: 3, lengths: [768, 768], tasks: [passkey, kv_retrieval, fact_recall]}, {source: text, count: 3, lengths: [768, 768], sources: [pydoc, essays, code]}]" \
  train.lr=2e-3 train.warmup_steps=20 train.save_every=10 train.eval_every=50 train.recall_prompts=6 train.recall_length=768 \
  allmem.key_init=query allmem.output_init=attention allmem.centre=true train.eta_lr_mult=10 train.lambda_gate=1.0 \
  train.gate_ratio=100 train.output_dir=out/recall-v15 train.init_adapter=docs/distill/recall/v14/adapter-step-001500 \
  "data=[$tasks, $text]" train.lambda_transfer=0.3 train.steps=400 train.save_total_limit=3 \
  --command "docs/distill/recall/v15/run.sh" \
  --warm-start docs/distill/recall/v14/metrics.jsonl --warm-start-command "docs/distill/recall/v14/run.sh train.steps=1500" \
  --about "SmolLM2-135M-Instruct with a memory that recalls past its window (recall-trained)" \
  --loss-png docs/distill/recall/v15/curves.png --to src/allmem/adapters/smollm2-allmem-recall \
  --notes "$(cat docs/distill/recall/v15/card-notes.md)"
