#!/bin/bash
# run v10 = v9 + attention transfer (train.lambda_transfer, after LoLCATs): every converted layer's output
# (window + alpha * memory) is also fit to what the pretrained full attention returns on the same inputs.
# v9 made the write gates single the needle out (10^3-10^4) but its answer CE stayed at ~1.8 nats: the
# memories got no direct signal of what their window lost. Resumed from v9's step 520
# (out/recall-v10/checkpoints/step-000520 is a copy of out/recall-v9/checkpoints/step-000520); 1,000 steps so
# that its learning rate decays within one session (from step 800; steps 521-670 ran with v9's 1,200).
# usage: docs/distill/recall/v10/run.sh [OVERRIDE ...] [--resume]      (THREADS=N, default 1)
exec "$(dirname "$0")/../v9/run.sh" train.output_dir=out/recall-v10 train.lambda_transfer=1.0 train.steps=1000 "$@"
