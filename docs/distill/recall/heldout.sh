#!/bin/bash
# Evaluate one checkpoint of a recall run (v17 and later) beside full attention, SWA + sinks and the shipped
# smollm2-allmem-recall (v19's step-60 memory since session 17; v16's step-200 before), all at window 64 with
# 4 sinks, on held-out text and haystacks: perplexity by position in 2k windows (4 documents), then passkey
# beyond the window with the recall margin at 1k, 2k and 4k tokens (needle depths 0.1-0.5, 4 prompts per depth
# and length). Results are kept per system in out/heldout-w64/{ppl,passkey}, so each system is computed once for
# all runs (the references' come from session 14's out/recall-v16 where it exists, the shipped one's from
# `heldout.sh v19 60`); the tables are copied beside the run as RUN/{ppl-2k,passkey}-step-NNNNNN.{md,png}.
# usage: docs/distill/recall/heldout.sh RUN STEP   e.g. v18 60   (THREADS=N, default 2)
set -euo pipefail
cd "$(dirname "$0")/../../.."
run=$1 n=$2
step=$(printf "step-%06d" "$n")
here=docs/distill/recall/$run
ck=out/recall-$run/checkpoints/$step
ad=out/recall-$run/adapter-$step
out=out/heldout-w64
shipped_run=v19 shipped_step=60
shipped=out/recall-$shipped_run/adapter-$(printf "step-%06d" $shipped_step)
[ -f $shipped/adapter.safetensors ] || shipped=src/allmem/adapters/smollm2-allmem-recall  # its bf16 copy
mkdir -p $out/ppl/nll $out/passkey
for earlier in out/recall-v16 out/recall-v17; do  # per-system results of sessions 14-15, same settings
  cp -n $earlier/ppl/nll/* $out/ppl/nll/ 2>/dev/null || true
  cp -n $earlier/ppl/run_settings.json $out/ppl/ 2>/dev/null || true
  for system in $earlier/passkey/*/; do
    if [ -d "$system" ] && [ ! -d "$out/passkey/$(basename "$system")" ]; then cp -r "$system" $out/passkey/; fi
  done
done
[ -f $ad/adapter.safetensors ] || COMMAND=adapter THREADS=${THREADS:-2} $here/run.sh --checkpoint $ck --out $ad
systems=(full:smollm2 "swa:smollm2?window=64&sinks=4" "allmem:$shipped?name=$shipped_run $shipped_step (W 64)")
[ "$run $n" = "$shipped_run $shipped_step" ] || systems+=("allmem:$ad?name=$run $n (W 64)")  # not twice
export OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
.venv/bin/allmem eval ppl --quiet --systems "${systems[@]}" --lengths 2048 --buckets 0 256 512 2048 --docs 4 --out $out/ppl
cp $out/ppl/ppl.md $here/ppl-2k-$step.md
cp $out/ppl/ppl.png $here/ppl-2k-$step.png
.venv/bin/allmem eval synthetic --quiet --systems "${systems[@]}" --tasks passkey --lengths 1024 2048 4096 \
  --depths 0.1 0.3 0.5 --samples 4 --split heldout --margin --out $out/passkey
cp $out/passkey/summary.md $here/passkey-$step.md
