#!/bin/bash
# Ship run v19's step-60 adapter as `smollm2-allmem-recall`, replacing v16's step-200 memory it started from (the
# card being replaced, with the totals of v14, v15 and v16, is the one committed in 93cb193).
# usage: docs/distill/recall/v19/ship.sh   (after docs/distill/recall/v19/run.sh finished in out/recall-v19)
exec "$(dirname "$0")/../ship.sh" v19 60 93cb193
