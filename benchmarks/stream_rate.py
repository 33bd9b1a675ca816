"""Streaming rate of ``make demo``'s first step: the demo's default model (the shipped
``smollm2-allmem`` adapter: window 256, 4 sinks, chunk 128; ``--model smollm2-allmem-recall`` for the
recall adapter, chunk 32) reads the demo's essays with planted facts through ``Session.read`` in
1024-token segments, and the script prints tokens per second, eager and (``--compiled``) under
``allmem.set_compiled(True)``.

The demo streams ~33k tokens; --tokens reads a prefix (8k by default: the rate is flat in the
length, every segment costs the same). To compare two source trees on a shared machine, alternate
them in separate processes and compare the medians:

    for src in /tmp/before/src src src /tmp/before/src; do
        PYTHONPATH=$src nice -n 19 .venv/bin/python benchmarks/stream_rate.py --rounds 3; done
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import allmem
from allmem.cli import default_model
from allmem.demo import planted_document
from allmem.session import Session


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="a shipped adapter (default: the demo's, %(default)s)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the demo document to read")
    parser.add_argument("--segment", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", action="store_true", help="also under allmem.set_compiled(True), interleaved")
    args = parser.parse_args()
    if min(args.tokens, args.segment, args.rounds, args.threads) < 1:
        parser.error("--tokens, --segment, --rounds and --threads must be positive")
    torch.set_num_threads(args.threads)
    model = allmem.from_pretrained(args.model)
    model.set_runtime(window=256, sinks=4)
    tokenizer = model.tokenizer
    tokenizer.model_max_length = 10**12
    document, _ = planted_document(tokenizer, args.tokens)
    modes = (False, True) if args.compiled else (False,)
    rates: dict[bool, list[float]] = {mode: [] for mode in modes}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):  # round 0 warms up (and compiles)
            for compiled in modes:
                allmem.set_compiled(compiled)
                session = Session(model, tokenizer, segment=args.segment)
                start = time.perf_counter()
                session.read(document, progress=False)
                if round_:
                    rates[compiled].append(session.tokens_read / (time.perf_counter() - start))
    allmem.set_compiled(False)
    source = allmem.__file__.rsplit("/allmem/", 1)[0]
    for compiled, values in rates.items():
        print(f"{source}: {'compiled' if compiled else 'eager'}: {statistics.median(values):.1f} tokens/s "
              f"(median of {args.rounds}; {', '.join(f'{v:.0f}' for v in values)}) reading {session.tokens_read} tokens "
              f"in segments of {args.segment}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
