#!/bin/bash
# run v14 = v9 -> v10 replayed exactly, from a fresh memory, in three stages in one command:
#   stage 1, steps 1-520:    v9 (write-gate loss, no attention transfer, schedule of 1,200 steps), the write
#                            masks marking only the asked needle (data[0].write_marks: answer), as v9 had;
#   stage 2, steps 521-670:  resumed with train.lambda_transfer=1, still the 1,200-step schedule (as v10 ran);
#   stage 3, steps 671-1000: resumed with train.steps=1000 (the learning rate decaying from step 800).
# v10 was the only run whose memory returned the code (held-out margin +12.4 at step 1000, taking off from
# step 700); v13 (250 gate steps, marks on every candidate, then transfer to 750) stayed within +-0.6. v14 asks
# whether v10 reproduces: if it does, the 520-step gate stage or the target-only marks made the difference.
# usage: docs/distill/recall/v14/run.sh [OVERRIDE ...]            (THREADS=N, default 1)
#        docs/distill/recall/v14/run.sh [OVERRIDE ...] --resume   continues from the newest checkpoint's stage
set -uo pipefail
here=$(dirname "$0")
out=out/recall-v14
data="data=[{source: tasks, count: 600, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0, write_marks: answer}, {source: text, count: 200, lengths: [384, 768], sources: [pydoc, essays, code]}]"
common=(train.output_dir=$out "$data" "$@")
resume=()
[[ " $* " == *" --resume "* ]] && resume=(--resume)

newest() { ls -d $out/checkpoints/step-* 2>/dev/null | sort | tail -1 | sed 's/.*step-0*//'; }

# run_until STEP ARGS...: train with ARGS until the checkpoint of STEP is written, then stop the trainer
run_until() {
  local stop=$1; shift
  local ckpt; ckpt=$(printf "%s/checkpoints/step-%06d" $out "$stop")
  "$here/../v9/run.sh" "$@" &
  local trainer=$!
  until [ -f "$ckpt/state.json" ] || [ -f "$ckpt/trainer_state.json" ] || ! kill -0 $trainer 2>/dev/null; do sleep 5; done
  sleep 20  # let the checkpoint finish writing
  pkill -P $trainer 2>/dev/null; kill $trainer 2>/dev/null; wait $trainer 2>/dev/null
  [ -d "$ckpt" ] || { echo "error: stage ending at step $stop stopped before its checkpoint $ckpt" >&2; exit 1; }
}

done_step=$(newest); done_step=${done_step:-0}
if (( done_step < 520 )); then
  run_until 520 "${common[@]}" "${resume[@]}"; resume=(--resume)
fi
if (( done_step < 670 )); then
  run_until 670 train.lambda_transfer=1.0 "${common[@]}" --resume
fi
exec "$here/../v9/run.sh" train.lambda_transfer=1.0 train.steps=1000 "${common[@]}" --resume
