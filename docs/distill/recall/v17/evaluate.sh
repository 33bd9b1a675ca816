#!/bin/bash
# Evaluate one checkpoint of run v17 beside v16 (its step-200 adapter), full attention and SWA + sinks, all at
# window 64 with 4 sinks, on held-out text and haystacks, as docs/distill/recall/v16/evaluate.sh does: perplexity by
# position in 2k windows, then passkey with the recall margin at 1k, 2k and 4k tokens (12 prompts per length).
# The references' and v16's results of session 14 are reused from out/recall-v16 where they exist.
# usage: docs/distill/recall/v17/evaluate.sh STEP   (THREADS=N, default 2)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
out=out/recall-v17
here=docs/distill/recall/v17
v16=out/recall-v16
v16_adapter=$v16/adapter-step-000200; [ -f $v16_adapter/adapter.safetensors ] || v16_adapter=docs/distill/recall/v16/adapter-step-000200
mkdir -p $out/ppl/nll $out/passkey
for name in full_smollm2 swa_smollm2_window_64_sinks_4 v16_200_W_64; do  # session 14's, same settings
  cp -n $v16/ppl/nll/${name}__* $out/ppl/nll/ 2>/dev/null || true
  [ -d $out/passkey/$name ] || cp -r $v16/passkey/$name $out/passkey/ 2>/dev/null || true
done
cp -n $v16/ppl/run_settings.json $out/ppl/ 2>/dev/null || true
step=$(printf "step-%06d" "$1")
ck=$out/checkpoints/$step
ad=$out/adapter-$step
[ -f $ad/adapter.safetensors ] || COMMAND=adapter THREADS=${THREADS:-2} $here/run.sh --checkpoint $ck --out $ad
systems=(full:smollm2 "swa:smollm2?window=64&sinks=4" "allmem:$v16_adapter?name=v16 200 (W 64)" "allmem:$ad?name=v17 $1 (W 64)")
export OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
.venv/bin/allmem eval ppl --quiet --systems "${systems[@]}" --lengths 2048 --buckets 0 256 512 2048 --docs 4 --out $out/ppl
cp $out/ppl/ppl.md $here/ppl-2k-$step.md
cp $out/ppl/ppl.png $here/ppl-2k-$step.png
.venv/bin/allmem eval synthetic --quiet --systems "${systems[@]}" --tasks passkey --lengths 1024 2048 4096 \
  --depths 0.1 0.3 0.5 --samples 4 --split heldout --margin --out $out/passkey
cp $out/passkey/summary.md $here/passkey-$step.md
