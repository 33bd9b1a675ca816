#!/bin/bash
# Evaluate one checkpoint of run v16 beside v15 (its step-400 adapter, shipped as smollm2-allmem-recall), full
# attention and SWA + sinks, all at window 64 with 4 sinks, on held-out text and haystacks: perplexity by position in
# 2k windows, then passkey beyond the window with the recall margin at 1k, 2k and 4k tokens (needle depths 0.1-0.5,
# 4 prompts per depth). Results are kept per system in out/recall-v16/{ppl,passkey}, so the three references are
# computed once (`evaluate.sh references` computes only them, e.g. while the run trains) and v15's session-13
# numbers are reused where they exist.
# usage: docs/distill/recall/v16/evaluate.sh STEP|references   (THREADS=N, default 2)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
out=out/recall-v16
here=docs/distill/recall/v16
v15=out/recall-v15
v15_adapter=$v15/adapter-step-000400; [ -f $v15_adapter/adapter.safetensors ] || v15_adapter=$(docs/distill/recall/v15/shipped.sh)  # its bf16 copy
systems=(full:smollm2 "swa:smollm2?window=64&sinks=4" "allmem:$v15_adapter?name=v15 400 (W 64)")
mkdir -p $out/ppl/nll $out/passkey
for name in full_smollm2 swa_smollm2_window_64_sinks_4 v15_400_W_64; do  # session 13's, same settings
  cp -n $v15/ppl-step-000400/nll/${name}__* $out/ppl/nll/ 2>/dev/null || true
  [ -d $out/passkey/$name ] || cp -r $v15/passkey-1k-step-000400/$name $out/passkey/ 2>/dev/null || true
done
cp -n $v15/ppl-step-000400/run_settings.json $out/ppl/ 2>/dev/null || true
tag=references
if [ "$1" != references ]; then
  step=$(printf "step-%06d" "$1"); tag=$step
  ck=$out/checkpoints/$step; [ -d $ck ] || ck=$out/kept/$step
  ad=$out/adapter-$step
  [ -f $ad/adapter.safetensors ] || COMMAND=adapter THREADS=${THREADS:-2} $here/run.sh --checkpoint $ck --out $ad
  systems+=("allmem:$ad?name=v16 $1 (W 64)")
fi
export OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
.venv/bin/allmem eval ppl --quiet --systems "${systems[@]}" --lengths 2048 --buckets 0 256 512 2048 --docs 4 --out $out/ppl
[ $tag = references ] || cp $out/ppl/ppl.md $here/ppl-2k-$tag.md
.venv/bin/allmem eval synthetic --quiet --systems "${systems[@]}" --tasks passkey --lengths 1024 2048 4096 \
  --depths 0.1 0.3 0.5 --samples 4 --split heldout --margin --out $out/passkey
[ $tag = references ] || cp $out/passkey/summary.md $here/passkey-$tag.md
