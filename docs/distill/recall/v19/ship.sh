#!/bin/bash
# Ship run v19's step-60 adapter as `smollm2-allmem-recall` (scripts/ship_adapter.py), replacing v16's step-200
# memory it started from: bf16 weights, the recipe as the run resolved it (`allmem distill --print-recipe` through
# v19/run.sh), the card with the steps, tokens and hours of v14, v15 and v16 (read from the v16 card being
# replaced) and v19.
# usage: docs/distill/recall/v19/ship.sh   (after docs/distill/recall/v19/run.sh finished in out/recall-v19)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
to=src/allmem/adapters/smollm2-allmem-recall
# the card being replaced is v16's, as committed in 93cb193: its totals and recipe are read from there
previous=$(mktemp -d); trap 'rm -rf "$previous"' EXIT
for f in training.json recipe.yaml; do git show 93cb193:$to/$f > "$previous"/$f; done
COMMAND="distill --print-recipe" docs/distill/recall/v19/run.sh > "$previous"/v19-recipe.yaml  # as the run resolved it
.venv/bin/python scripts/ship_adapter.py --run out/recall-v19 --adapter out/recall-v19/adapter-step-000060 \
  --recipe "$previous"/v19-recipe.yaml \
  --command "docs/distill/recall/v19/run.sh" --warm-start "$previous" \
  --about "SmolLM2-135M-Instruct with a memory that recalls past its window (recall-trained)" \
  --loss-png docs/distill/recall/v19/curves.png --to $to \
  --notes "$(cat docs/distill/recall/v19/card-notes.md)"
