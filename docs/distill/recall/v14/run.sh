#!/bin/bash
# run v14 = v9 -> v10 replayed exactly, from a fresh memory, in stages in one command (as v9 and v10 ran):
#   steps 1-500:    v9 (write-gate loss, no attention transfer, schedule of 1,200 steps), the write masks
#                   marking only the asked needle (write_marks: answer, the masks before commit fd2f9bc);
#   steps 501-520:  resumed with every candidate fact marked (v9 was resumed at 500 after fd2f9bc);
#   steps 521-670:  resumed with train.lambda_transfer=1 (v10 started from v9's step 520), 1,200-step schedule;
#   steps 671-1000: resumed with train.steps=1000 (the learning rate decaying from step 800).
# v10 was the only run whose memory returned the code (held-out margin +12.4 at step 1000, taking off from
# step 700); v13 (250 gate steps, every candidate marked, then transfer to 750) stayed within +-0.6. v14 asks
# whether v10 reproduces. Steps 1-30 match v9's logged losses to 4 decimals (v9 was resumed at 30; from there
# they differ by ~1e-4). Result (session 11): recall again, later and slower: held-out margin +1.0 from step
# 800 (6 of 6 prompts), +2.6 at 1000 (v10 +12.4). Session 12, train.steps=1500 (resumed at 1060): +18.9 at
# 1500, above full attention's +13.4; passkey 1k/2k/4k exact 16.7 %, digits in place 67/57/58 %, margin ~+20.
# usage: docs/distill/recall/v14/run.sh [OVERRIDE ...]   (THREADS=N, default 1); run again to continue from
#        the newest checkpoint in out/recall-v14, in whatever stage it is; COMMAND=adapter ... as v5/run.sh
set -uo pipefail
here=$(dirname "$0")
out=out/recall-v14
tasks="{source: tasks, count: 600, lengths: [384, 768], tasks: [passkey, niah_multikey, niah_multivalue, kv_retrieval, fact_recall], lambda_ce: 1.0"
text="{source: text, count: 200, lengths: [384, 768], sources: [pydoc, essays, code]}"
answer_marks="data=[$tasks, write_marks: answer}, $text]"
fact_marks="data=[$tasks, write_marks: facts}, $text]"

if [ -n "${COMMAND:-}" ]; then  # e.g. COMMAND=adapter ... --checkpoint DIR (evaluate.sh): the last stage's settings
  exec "$here/../v9/run.sh" train.output_dir=$out "$fact_marks" train.lambda_transfer=1.0 train.steps=1000 "$@"
fi

newest() { ls -d $out/checkpoints/step-* 2>/dev/null | sort | tail -1 | sed 's/.*step-0*//'; }
done_step=$(newest); done_step=${done_step:-0}
resume=(); (( done_step > 0 )) && resume=(--resume)

# run_until STEP ARGS...: train with ARGS until the checkpoint of STEP is written, then stop the trainer
run_until() {
  local stop=$1; shift
  local ckpt; ckpt=$(printf "%s/checkpoints/step-%06d" $out "$stop")
  "$here/../v9/run.sh" train.output_dir=$out "$@" "${resume[@]}" &
  local trainer=$!
  until [ -f "$ckpt/state.json" ] || ! kill -0 $trainer 2>/dev/null; do sleep 5; done
  sleep 20  # let the checkpoint finish writing
  pkill -P $trainer 2>/dev/null; kill $trainer 2>/dev/null; wait $trainer 2>/dev/null
  [ -d "$ckpt" ] || { echo "error: the stage ending at step $stop stopped before writing $ckpt" >&2; exit 1; }
  resume=(--resume)
}

(( done_step < 500 )) && run_until 500 "$answer_marks" "$@"
(( done_step < 520 )) && run_until 520 "$fact_marks" "$@"
(( done_step < 670 )) && run_until 670 "$fact_marks" train.lambda_transfer=1.0 "$@"
exec "$here/../v9/run.sh" train.output_dir=$out "$fact_marks" train.lambda_transfer=1.0 train.steps=1000 "$@" --resume
