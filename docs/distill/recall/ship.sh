#!/bin/bash
# Ship one checkpoint of a recall run as `smollm2-allmem-recall` (scripts/ship_adapter.py), replacing the memory the
# run started from: bf16 weights, the recipe as the run resolved it (`allmem distill --print-recipe` through
# RUN/run.sh), RUN/card-notes.md and RUN/curves.png on the card, and the steps, tokens and hours of every earlier
# run added from the card being replaced (PREVIOUS: the commit that holds it, whose recipe is kept as
# warm-start-recipe.yaml).
# usage: docs/distill/recall/ship.sh RUN STEP PREVIOUS   e.g. v19 60 93cb193   (after RUN/run.sh finished in out/recall-RUN)
set -euo pipefail
cd "$(dirname "$0")/../../.."
run=$1 step=$(printf "step-%06d" "$2") previous_commit=$3
here=docs/distill/recall/$run
to=src/allmem/adapters/smollm2-allmem-recall
previous=$(mktemp -d); trap 'rm -rf "$previous"' EXIT
for f in training.json recipe.yaml; do git show "$previous_commit:$to/$f" > "$previous/$f"; done
COMMAND="distill --print-recipe" $here/run.sh > "$previous/$run-recipe.yaml"  # as the run resolved it
.venv/bin/python scripts/ship_adapter.py --run out/recall-$run --adapter out/recall-$run/adapter-$step \
  --recipe "$previous/$run-recipe.yaml" \
  --command "$here/run.sh" --warm-start "$previous" \
  --about "SmolLM2-135M-Instruct with a memory that recalls past its window (recall-trained)" \
  --loss-png $here/curves.png --to $to \
  --notes "$(cat $here/card-notes.md)"
