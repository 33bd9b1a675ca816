"""Where the memory op's time goes: torch.profiler over one chunk_ttt call (SmolLM2 shapes:
3 heads x 64, 8k tokens) at chunk 128 and 512, the chunk sizes where it is furthest from
matmul speed. Writes benchmarks/results/memory_op_profile.txt.

    .venv/bin/python benchmarks/profile_memory_op.py [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "memory_op_profile.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d, length = 3, 64, 8192
    sections = []
    for chunk in (128, 512):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, length, d, generator=g) for _ in range(3))
        eta, beta = torch.full((n, length), 0.1), torch.full((n, length // chunk), 0.5)
        w0 = FastWeights(*(torch.randn(n, d, d, generator=g) / 8 for _ in range(3)))
        state = TTTState(w0, FastWeights(*(torch.zeros_like(w) for w in w0)))
        with torch.no_grad():
            chunk_ttt(q, k, v, eta, beta, state, row_norms(w0), chunk_size=chunk)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                chunk_ttt(q, k, v, eta, beta, state, row_norms(w0), chunk_size=chunk)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        sections.append(f"chunk {chunk} ({length // chunk} chunks), {args.threads} threads\n{table}")
    args.out.write_text("\n\n".join(sections) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
