"""AllMem against full attention at short context (1k tokens), interleaved in one process: the real
SmolLM2 with transformers' SDPA attention and its standard cache ("full") against the converted model
(window 256, 4 sinks, chunk 128, memory on), eager, with only the memory compiled
(``allmem.memory.set_compiled``, as before session 17) and under ``allmem.set_compiled(True)`` (a
decode token's every decoder layer as one graph, ``allmem.modeling.decode_block``). Every round
times one prefill of --length tokens and then --decode-tokens decode tokens (each timed alone; the
decode cache goes on across rounds, at 1k it writes no chunk) of each system in turn, so a slow phase
of a shared machine hits all of them alike; medians over the rounds (decode: over all its tokens),
and the ratios to full attention. (``benchmarks/bench.py`` measures each point in a fresh process instead, across lengths;
``benchmarks/profile_1k.py`` shows where the time goes.)

    nice -n 19 .venv/bin/python benchmarks/short_context.py [--threads 2] [--length 1024] [--rounds 9] [--decode-tokens 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import allmem
import allmem.memory
from allmem.corpus import long_document
from profile_1k import prefill_and_decode  # the same prefill and decode calls as the profile


def compile_mode(mode: str) -> None:
    """"eager", "memory" (the memory's decode read and chunk step) or "all" (the decoder layers too)."""
    allmem.set_compiled(mode == "all")
    if mode == "memory":
        allmem.memory.set_compiled(True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--decode-tokens", type=int, default=8,
                        help="decode tokens timed one by one in each round after its prefill (median over all)")
    args = parser.parse_args()
    if min(args.threads, args.length, args.rounds, args.decode_tokens) < 1:
        parser.error("--threads, --length, --rounds and --decode-tokens must be positive")
    torch.set_num_threads(args.threads)
    full, tok = allmem.load_base("smollm2")
    converted = allmem.convert(allmem.load_base("smollm2")[0], allmem.AllMemConfig(window=256, sinks=4, chunk=128))
    full.eval(), converted.eval()
    for layer in converted.model.layers:
        layer.self_attn.alpha.data.fill_(0.1)  # the memory's output reaches the residual, as trained
    ids = tok(long_document(), return_tensors="pt").input_ids
    while ids.shape[1] < args.length + args.rounds * args.decode_tokens + 2:
        ids = torch.cat([ids, ids], dim=1)
    prompt, follow = ids[:, : args.length], ids[:, args.length :]

    full_prefill, full_decode = prefill_and_decode(full, False, prompt, follow)
    allmem_prefill, allmem_decode = prefill_and_decode(converted, True, prompt, follow)
    systems = {"full": (full_prefill, full_decode, "eager"), "allmem-256": (allmem_prefill, allmem_decode, "eager"),
               "allmem-256 memory compiled": (allmem_prefill, allmem_decode, "memory"),
               "allmem-256 compiled": (allmem_prefill, allmem_decode, "all")}
    caches, prefill_s, decode_s = {}, {n: [] for n in systems}, {n: [] for n in systems}
    with torch.no_grad():
        for name, (prefill, decode, compiled) in systems.items():  # warm-up and compilation, not timed
            compile_mode(compiled)
            caches[name] = prefill()
            decode(caches[name], 0)
        for r in range(args.rounds):
            for name, (prefill, decode, compiled) in systems.items():
                compile_mode(compiled)
                t0 = time.perf_counter()
                prefill()
                prefill_s[name].append(time.perf_counter() - t0)
                for t in range(args.decode_tokens):  # the decode cache goes on from the last round's token
                    t0 = time.perf_counter()
                    decode(caches[name], 1 + r * args.decode_tokens + t)
                    decode_s[name].append(time.perf_counter() - t0)
    compile_mode("eager")
    print(f"{args.length} tokens, {args.rounds} interleaved rounds of a prefill and {args.decode_tokens} decode tokens, "
          f"{args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'system':<28} {'prefill ms':>11} {'x full':>7} {'decode ms/token':>16} {'x full':>7}")
    med_p = {n: 1000 * statistics.median(v) for n, v in prefill_s.items()}
    med_d = {n: 1000 * statistics.median(v) for n, v in decode_s.items()}
    for name in systems:
        print(f"{name:<28} {med_p[name]:11.1f} {med_p[name] / med_p['full']:7.2f} {med_d[name]:16.1f} "
              f"{med_d[name] / med_d['full']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
