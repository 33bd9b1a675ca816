"""The memory's share of one decode token, eager against ``allmem.set_compiled(True)``, in one
process: 30 memory layers of SmolLM2's shape (3 heads x 64, one per key/value head as in the shipped
adapters; chunk 128, random weights: speed does not depend on the values), one token each, no chunk write (the write happens once per chunk and
runs eager in both). Rounds alternate eager and compiled; medians of --rounds.

    nice -n 19 .venv/bin/python benchmarks/decode_memory.py [--threads 2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import allmem
from allmem.memory import AllMemMemory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=3, help="memory heads of 64 (SmolLM2: 3, its key/value heads)")
    args = parser.parse_args()
    if min(args.threads, args.rounds, args.layers, args.batch, args.heads) < 1:
        parser.error("--threads, --rounds, --layers, --batch and --heads must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = allmem.AllMemConfig(window=256, sinks=4, chunk=128)
    layers = [AllMemMemory(576, args.heads, 64, config).eval() for _ in range(args.layers)]
    states = [m.empty_state(args.batch, config.chunk) for m in layers]
    x = torch.randn(args.batch, 1, 576)
    one = torch.ones(args.batch, dtype=torch.long)

    def token() -> tuple[float, torch.Tensor]:
        for state in states:
            state.fill.zero_()  # never reaches a chunk write
        t0 = time.perf_counter()
        with torch.no_grad():
            for memory, state in zip(layers, states):
                out, _ = memory(x, one, state, config, keep_state=True)
        return time.perf_counter() - t0, out

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    outputs = {}
    for mode in ("eager", "compiled"):  # warm-up, and the compilation (not timed)
        allmem.set_compiled(mode == "compiled")
        t0 = time.perf_counter()
        outputs[mode] = token()[1]
        print(f"{mode} first token (warm-up{', compiles' if mode == 'compiled' else ''}): {time.perf_counter() - t0:.1f} s")
    for _ in range(args.rounds):
        for mode in ("eager", "compiled"):
            allmem.set_compiled(mode == "compiled")
            times[mode].append(token()[0])
    allmem.set_compiled(False)
    eager, compiled = (1000 * statistics.median(times[m]) for m in ("eager", "compiled"))
    print(f"{args.layers} memory layers of {args.heads} heads, batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    print(f"eager    {eager:7.2f} ms / token (median of {args.rounds})")
    print(f"compiled {compiled:7.2f} ms / token  ({eager / compiled:.2f}x faster)")
    print(f"largest output difference: {(outputs['eager'] - outputs['compiled']).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
