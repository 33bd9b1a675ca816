#!/bin/bash
# Print the path of v15's step-400 memory as it shipped (session 13, bf16, commit fa48d8f) as
# smollm2-allmem-recall, written from git into out/recall-v15/shipped the first time: the package's folder of that
# name holds v16 since session 15, so scripts that fall back on v15's shipped copy read it from here.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
to=out/recall-v15/shipped
if [ ! -f $to/adapter.safetensors ]; then
  mkdir -p $to
  for f in allmem_config.json adapter.safetensors; do
    git show fa48d8f:src/allmem/adapters/smollm2-allmem-recall/$f > $to/$f.tmp && mv $to/$f.tmp $to/$f
  done
fi
echo $to
