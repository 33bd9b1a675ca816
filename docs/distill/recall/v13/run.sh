#!/bin/bash
# run v13 = v10's path again, from a fresh memory, in two stages in one command (v10's checkpoints were lost):
#   stage 1: v9's settings (write-gate loss, no attention transfer) for STAGE1 steps (default 250; v9 ran 520);
#   stage 2: resumed from stage 1's last checkpoint with train.lambda_transfer=1, to train.steps (default 750,
#            the learning rate decaying over the last 20 %).
# v10 (stage 2 after v9's 520 steps) was the only run whose memory returned the code (held-out margin +12.4,
# passkey digits 60 % in place); v11 (transfer from step 1) and v12 (v11 + the needle loss) did not. v13
# asks whether the order (gates first, then transfer) is what made the difference.
# usage: docs/distill/recall/v13/run.sh [OVERRIDE ...]      (THREADS=N, default 1; STAGE1=N)
#        docs/distill/recall/v13/run.sh [OVERRIDE ...] --resume   continues stage 2 from the newest checkpoint
set -uo pipefail
here=$(dirname "$0")
out=out/recall-v13
common=(train.output_dir=$out train.steps=750 "$@")
if [[ " $* " != *" --resume "* ]]; then
  stage1=$(printf "%s/checkpoints/step-%06d" $out "${STAGE1:-250}")
  "$here/../v9/run.sh" "${common[@]}" &
  trainer=$!
  until [ -f "$stage1/state.json" ] || [ -f "$stage1/trainer_state.json" ] || ! kill -0 $trainer 2>/dev/null; do sleep 5; done
  sleep 20  # let the checkpoint finish writing
  pkill -P $trainer 2>/dev/null; kill $trainer 2>/dev/null; wait $trainer 2>/dev/null
  common+=(--resume)
fi
exec "$here/../v9/run.sh" train.lambda_transfer=1.0 "${common[@]}"
