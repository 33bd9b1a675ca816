#!/bin/bash
# Ship run v16's step-200 adapter as `smollm2-allmem-recall`, replacing v15 (the card being replaced, with the totals
# of v14 and v15, is the one committed in fa48d8f). Shipped in session 15; v19 replaced it in session 17.
# usage: docs/distill/recall/v16/ship.sh   (after docs/distill/recall/v16/run.sh finished in out/recall-v16)
exec "$(dirname "$0")/../ship.sh" v16 200 fa48d8f
