#!/bin/bash
# Ship run v16's step-200 adapter as `smollm2-allmem-recall` (scripts/ship_adapter.py), replacing v15: bf16
# weights, the recipe as the run resolved it (`allmem distill --print-recipe` through v16/run.sh: v5's, v9's and
# v16's overrides in that order), the card with the steps, tokens and hours of v14, v15 (read from the v15 card
# being replaced) and v16.
# usage: docs/distill/recall/v16/ship.sh   (after docs/distill/recall/v16/run.sh finished in out/recall-v16)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
to=src/allmem/adapters/smollm2-allmem-recall
# the card being replaced is v15's, as committed in fa48d8f: its totals and recipe are read from there
previous=$(mktemp -d); trap 'rm -rf "$previous"' EXIT
for f in training.json recipe.yaml; do git show fa48d8f:$to/$f > "$previous"/$f; done
COMMAND="distill --print-recipe" docs/distill/recall/v16/run.sh > "$previous"/v16-recipe.yaml  # as the run resolved it
.venv/bin/python scripts/ship_adapter.py --run out/recall-v16 --adapter out/recall-v16/adapter-step-000200 \
  --recipe "$previous"/v16-recipe.yaml \
  --command "docs/distill/recall/v16/run.sh" --warm-start "$previous" \
  --about "SmolLM2-135M-Instruct with a memory that recalls past its window (recall-trained)" \
  --loss-png docs/distill/recall/v16/curves.png --to $to \
  --notes "$(cat docs/distill/recall/v16/card-notes.md)"
