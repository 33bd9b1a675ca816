"""The memory's share of one decode token, eager against ``allmem.set_compiled(True)``, in one
process: 30 memory layers of SmolLM2's shape (3 heads x 64, one per key/value head as in the shipped
adapters; chunk 128, random weights: speed does not depend on the values), one token each, no chunk
write (the write happens once per chunk and runs eager in both). Rounds interleave the modes; medians
of --rounds. Beside the whole step it times its two parts: the read (``allmem.memory.decode_read``:
projections, conv, norms, fast-weight read, gate, output; what ``set_compiled`` compiles) and the
eager buffering of the token's key, value and rates into the partial chunk. ``--profile`` prints the
compiled read's operators (torch.profiler, self CPU time).

    nice -n 19 .venv/bin/python benchmarks/decode_memory.py [--threads 2] [--rounds 30] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import allmem
import allmem.memory
from allmem.memory import AllMemMemory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=3, help="memory heads of 64 (SmolLM2: 3, its key/value heads)")
    parser.add_argument("--profile", action="store_true", help="also print the compiled read's top operators")
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
    k = torch.randn(args.batch, args.heads, 1, 64)
    rates = torch.ones(args.batch, args.heads, 1)

    def step(memory, state):  # the whole decode step, as the model runs it
        return memory(x, one, state, config, keep_state=True)[0]

    def read(memory, state):
        return allmem.memory._DECODE_READ["fn"](memory, x, state.conv, state.weights, config)[0]

    def buffer(memory, state):
        return memory.decode_write(k, k, rates, rates, state, config).buffer_k

    def token(part) -> tuple[float, torch.Tensor]:
        for state in states:
            state.fill.zero_()  # never reaches a chunk write
        t0 = time.perf_counter()
        with torch.no_grad():
            for memory, state in zip(layers, states):
                out = part(memory, state)
        return time.perf_counter() - t0, out

    runs = {"step eager": (step, False), "step compiled": (step, True), "read eager": (read, False),
            "read compiled": (read, True), "buffer (eager)": (buffer, False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for name, (part, compiled) in runs.items():  # warm-up, and the compilation (not timed)
        allmem.set_compiled(compiled)
        t0 = time.perf_counter()
        outputs[name] = token(part)[1]
        if name.startswith("step"):
            print(f"{name} first token (warm-up{', compiles' if compiled else ''}): {time.perf_counter() - t0:.1f} s")
    for _ in range(args.rounds):
        for name, (part, compiled) in runs.items():
            allmem.set_compiled(compiled)
            times[name].append(token(part)[0])
    print(f"{args.layers} memory layers of {args.heads} heads, batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:15s} {value:7.2f} ms / token (median of {args.rounds})")
    print(f"step: compiled {ms['step eager'] / ms['step compiled']:.2f}x faster than eager; "
          f"read: {ms['read eager'] / ms['read compiled']:.2f}x")
    print(f"largest output difference: {(outputs['step eager'] - outputs['step compiled']).abs().max().item():.2e}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        allmem.set_compiled(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                token(read)
        print(f"compiled read, 5 tokens x {args.layers} layers:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    allmem.set_compiled(False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
