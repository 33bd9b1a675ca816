"""Cost of AllMem against full attention on the real SmolLM2, measured in one run.

    .venv/bin/python benchmarks/bench.py             # 1k ... 32k, AllMem-256 also at 64k and compiled (about 40 min)
    .venv/bin/python benchmarks/bench.py --quick     # 1k, 4k, 8k (a few minutes)

Every (system, length) point runs in a fresh subprocess so peak resident memory belongs
to that point alone. Decode is the median over --decode-steps tokens after 4 warm-up
tokens; the memory op's efficiency is the best of 5 interleaved rounds of op and matmul
(the machine is shared: the best round is the least disturbed one). Systems: the base model with transformers SDPA attention and its
standard cache ("full"), the converted model ("allmem-W", 4 sinks, chunk 128, memory
on), and the same under ``allmem.set_compiled(True)`` ("allmem-W-compiled", --compiled-windows;
its graphs compiled in an untimed warm-up). Per point: prefill wall time, decode ms/token (median over --decode-steps tokens after
the prefill), cache bytes and peak RSS. Then the memory op's GFLOP/s, eager and compiled, against
a plain torch.matmul of comparable shape in the same process. Writes results/bench.{json,md} and
PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP = 4  # decode tokens not timed


def measure_point(system: str, length: int, decode_steps: int, threads: int) -> dict:
    import torch

    import allmem
    from allmem.corpus import long_document

    torch.set_num_threads(threads)
    base, tok = allmem.load_base("smollm2")
    text = long_document()
    ids = tok(text, return_tensors="pt").input_ids
    while ids.shape[1] < length + WARMUP + decode_steps:
        ids = torch.cat([ids, ids], dim=1)
    prompt, follow = ids[:, :length], ids[:, length : length + WARMUP + decode_steps]
    times = []
    with torch.no_grad():
        if system == "full":
            model = base
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            cache = out.past_key_values
            for t in range(WARMUP + decode_steps):
                t0 = time.perf_counter()
                out = model(follow[:, t : t + 1], past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - t0)
                cache = out.past_key_values
            cache_bytes = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                              for layer in cache.layers)
        else:
            window = int(system.split("-")[1])
            model = allmem.convert(base, allmem.AllMemConfig(window=window, sinks=4, chunk=128)).eval()
            with torch.no_grad():  # memory on: a non-zero alpha so no work is skipped anywhere
                for layer in model.model.layers:
                    layer.self_attn.alpha.fill_(0.1)
            if system.endswith("-compiled"):
                # allmem.set_compiled: every graph (chunk step, decode step) has one shape at any
                # length, so a short warm-up on another cache compiles them all before the clock runs
                allmem.set_compiled(True)
                warm = model.new_cache()
                model(prompt[:, :300], cache=warm, logits_to_keep=1)
                for t in range(WARMUP):
                    model(follow[:, t : t + 1], cache=warm)
            cache = model.new_cache()
            t0 = time.perf_counter()
            for start in range(0, length, 4096):  # constant-memory ingestion
                model(prompt[:, start : start + 4096], cache=cache, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            for t in range(WARMUP + decode_steps):
                t0 = time.perf_counter()
                model(follow[:, t : t + 1], cache=cache)
                times.append(time.perf_counter() - t0)
            cache_bytes = cache.nbytes()
    return {
        "system": system, "length": length, "prefill_s": prefill, "decode_ms": 1000 * statistics.median(times[WARMUP:]),
        "cache_bytes": cache_bytes, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def baseline_op(src: Path | None):
    """chunk_ttt from another source tree's ``allmem/ops/ttt/chunk.py`` (e.g. ``git archive`` of
    an older commit), loaded beside the installed one so both are timed in one process."""
    if src is None:
        return None
    import importlib.util

    path = src / "allmem" / "ops" / "ttt" / "chunk.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    spec = importlib.util.spec_from_file_location("allmem.ops.ttt._baseline_chunk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its relative imports resolve in the installed package
    return module.chunk_ttt


def memory_op_efficiency(threads: int, baseline_src: Path | None = None) -> list[dict]:
    """GFLOP/s of chunk_ttt (SmolLM2 shapes: 3 heads x d 64, batch 1, 8k tokens) vs torch.matmul,
    eager and under ``set_compiled`` (each writing chunk one compiled graph), and of a baseline
    chunk_ttt when ``baseline_src`` is given, all interleaved in the same rounds."""
    import torch

    from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms, set_compiled

    torch.set_num_threads(threads)
    baseline = baseline_op(baseline_src)
    n, d, length = 3, 64, 8192
    rows = []
    for chunk in (128, 512, 2048):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, length, d, generator=g) for _ in range(3))
        eta = torch.full((n, length), 0.1)
        beta = torch.full((n, length // chunk), 0.5)
        w0 = FastWeights(*(torch.randn(n, d, d, generator=g) / 8 for _ in range(3)))
        state = TTTState(w0, FastWeights(*(torch.zeros_like(w) for w in w0)))
        norms = row_norms(w0)
        a, b = torch.randn(n, chunk, d), torch.randn(n, d, d)
        # matmul FLOPs per chunk: read 3 (C x d x d); update: forward on the keys 3, backward 4
        flops = (length // chunk) * 10 * 2 * n * chunk * d * d
        matmuls = (length // chunk) * 10  # as many plain matmuls of one chunk's shape
        op_times, compiled_times, mm_times, base_times = [], [], [], []
        with torch.no_grad():
            for compiled in (True, False):  # warm-up (and compilation)
                set_compiled(compiled)
                chunk_ttt(q, k, v, eta, beta, state, norms, chunk_size=chunk)
            for _ in range(5):
                for compiled, times in ((False, op_times), (True, compiled_times)):
                    set_compiled(compiled)
                    t0 = time.perf_counter()
                    chunk_ttt(q, k, v, eta, beta, state, norms, chunk_size=chunk)
                    times.append(time.perf_counter() - t0)
                set_compiled(False)
                t0 = time.perf_counter()
                for _ in range(matmuls):
                    torch.matmul(a, b)
                mm_times.append((time.perf_counter() - t0) / matmuls)
                if baseline is not None:
                    t0 = time.perf_counter()
                    baseline(q, k, v, eta, beta, state, norms, chunk_size=chunk)
                    base_times.append(time.perf_counter() - t0)
        op_gflops = flops / min(op_times) / 1e9
        mm_gflops = 2 * n * chunk * d * d / min(mm_times) / 1e9
        compiled_gflops = flops / min(compiled_times) / 1e9
        row = {"chunk": chunk, "op_gflops": op_gflops, "matmul_gflops": mm_gflops, "ratio": op_gflops / mm_gflops,
               "compiled_gflops": compiled_gflops, "compiled_ratio": compiled_gflops / mm_gflops}
        if baseline is not None:
            row["baseline_ratio"] = flops / min(base_times) / 1e9 / mm_gflops
        rows.append(row)
    return rows


def target_lines(points: list[dict], op_rows: list[dict]) -> list[str]:
    """The issue's targets as ratios of this run's numbers (where both points exist)."""
    at = {(p["system"], p["length"]): p for p in points if "error" not in p}
    lines = ["Targets (ratios from this run):", ""]
    longest = max((n for s, n in at if s == "full"), default=None)
    for system in sorted({s for s, _ in at if s.startswith("allmem")}):
        mine = {n: p for (s, n), p in at.items() if s == system}
        if 1024 in mine and longest in mine:
            r = mine[longest]["decode_ms"] / mine[1024]["decode_ms"]
            lines.append(f"- {system} decode at {longest} / at 1024: {r:.2f} (target <= 1.15)")
        if longest in mine:
            full = at[("full", longest)]
            lines.append(f"- full / {system} decode at {longest}: {full['decode_ms'] / mine[longest]['decode_ms']:.2f}x "
                         "(target >= 6)")
            lines.append(f"- full / {system} prefill at {longest}: {full['prefill_s'] / mine[longest]['prefill_s']:.2f}x "
                         "(target >= 3.5)")
            lines.append(f"- {system} cache / full KV cache at {longest}: "
                         f"{100 * mine[longest]['cache_bytes'] / full['cache_bytes']:.1f} % (target <= 10 %)")
        if 1024 in mine and ("full", 1024) in at:
            full = at[("full", 1024)]
            lines.append(f"- {system} / full prefill at 1024: {mine[1024]['prefill_s'] / full['prefill_s']:.2f}x "
                         "(target <= 1.3)")
            lines.append(f"- {system} / full decode at 1024: {mine[1024]['decode_ms'] / full['decode_ms']:.2f}x "
                         "(target <= 1.2)")
        both = sorted(n for n in mine if ("full", n) in at)
        for what, key in (("prefill", "prefill_s"), ("decode", "decode_ms")):
            faster = [n for n in both if mine[n][key] <= at[("full", n)][key]]
            where = f"{faster[0]} tokens" if faster else f"not within {both[-1] if both else 0} tokens"
            lines.append(f"- {system} {what} crossover (first measured length where it is faster): {where} (target <= 4096)")
        sizes = {n: p["cache_bytes"] for n, p in mine.items() if n >= 2048}
        if len(sizes) > 1:
            same = len(set(sizes.values())) == 1
            lines.append(f"- {system} cache identical at {', '.join(map(str, sorted(sizes)))} tokens: {'yes' if same else 'NO'}")
    for r in op_rows:
        lines.append(f"- memory op / matmul GFLOP/s at chunk {r['chunk']}: eager {r['ratio']:.2f}, compiled "
                     f"{r['compiled_ratio']:.2f} (target >= 0.45)")
    return lines


def machine_description(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        ram = f", {mem / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        ram = ""
    return f"{cpu}, {os.cpu_count()} cores{ram}, torch {torch.__version__} with {threads} threads"


def write_report(points: list[dict], op_rows: list[dict], out: Path, args) -> str:
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(args.threads)
    lines = [f"Machine: {machine}; python {platform.python_version()}", "",
             "| system | tokens | prefill s | decode ms/token | cache MiB | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in sorted(points, key=lambda p: (p["system"], p["length"])):
        if "error" in p:
            lines.append(f"| {p['system']} | {p['length']} | {p['error']} | | | |")
            continue
        lines.append(f"| {p['system']} | {p['length']} | {p['prefill_s']:.1f} | {p['decode_ms']:.1f} | "
                     f"{p['cache_bytes'] / 2**20:.1f} | {p['peak_rss_mib']:.0f} |")
    base = any("baseline_ratio" in r for r in op_rows)
    lines += ["", "Memory op (chunk_ttt, 3 heads x 64, 8k tokens) vs torch.matmul [3, C, 64] x [3, 64, 64]"
              + (f" (baseline: {args.op_baseline}, same rounds)" if base else "") + ":", "",
              "| chunk | op GFLOP/s | compiled op GFLOP/s | matmul GFLOP/s | ratio | compiled ratio |"
              + (" baseline ratio |" if base else ""),
              "| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if base else "")]
    for r in op_rows:
        lines.append(f"| {r['chunk']} | {r['op_gflops']:.1f} | {r['compiled_gflops']:.1f} | {r['matmul_gflops']:.1f} | "
                     f"{r['ratio']:.2f} | {r['compiled_ratio']:.2f} |" + (f" {r['baseline_ratio']:.2f} |" if base else ""))
    lines += ["", *target_lines(points, op_rows)]
    text = "\n".join(lines) + "\n"
    name = "bench_op" if args.op_only else "bench"  # --op-only leaves the model table alone
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "points": points, "memory_op": op_rows}, indent=1))
    if args.op_only:
        return text
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for system in sorted({p["system"] for p in points}):
            ps = sorted((p for p in points if p["system"] == system and "error" not in p), key=lambda p: p["length"])
            xs = [p["length"] for p in ps]
            axes[0].plot(xs, [p["prefill_s"] for p in ps], "o-", label=system)
            axes[1].plot(xs, [p["decode_ms"] for p in ps], "o-", label=system)
            axes[2].plot(xs, [p["cache_bytes"] / 2**20 for p in ps], "o-", label=system)
        for ax, title in zip(axes, ("prefill (s)", "decode (ms/token)", "cache (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context tokens")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"SmolLM2-135M: full attention vs AllMem ({machine})")
        fig.tight_layout()
        fig.savefig(out / "bench.png", dpi=110)
    except ImportError:
        pass
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k, 4k, 8k only")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--allmem-extra", type=int, nargs="*", default=[65536], help="lengths for AllMem only")
    parser.add_argument("--extra-windows", type=int, nargs="*", default=[256], help="windows run at --allmem-extra")
    parser.add_argument("--windows", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--compiled-windows", type=int, nargs="*", default=[256],
                        help="windows also run under allmem.set_compiled(True) (\"allmem-W-compiled\"), at --lengths")
    parser.add_argument("--full-max", type=int, default=32768, help="longest full-attention point")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--op-only", action="store_true", help="only the memory-op table (no model points)")
    parser.add_argument("--op-baseline", type=Path, default=None, metavar="SRC",
                        help="also time chunk_ttt from SRC/allmem/ops/ttt/chunk.py (e.g. a git archive of an older commit)")
    parser.add_argument("--point", nargs=2, metavar=("SYSTEM", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args.decode_steps, args.threads)))
        return 0
    if args.quick:
        args.lengths, args.allmem_extra = [1024, 4096, 8192], []
    if args.op_baseline is not None and not (args.op_baseline / "allmem" / "ops" / "ttt" / "chunk.py").is_file():
        print(f"error: --op-baseline {args.op_baseline} holds no allmem/ops/ttt/chunk.py", file=sys.stderr)
        return 2
    plan = [("full", n) for n in args.lengths if n <= args.full_max]
    plan += [(f"allmem-{w}", n) for w in args.windows
             for n in args.lengths + (args.allmem_extra if w in args.extra_windows else [])]
    plan += [(f"allmem-{w}-compiled", n) for w in args.compiled_windows for n in args.lengths]
    if args.op_only:
        plan = []
    points = []
    for system, length in plan:
        print(f"[bench] {system} @ {length} ...", flush=True)
        cmd = [sys.executable, __file__, "--point", system, str(length), "--decode-steps", str(args.decode_steps),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["failed"]
            points.append({"system": system, "length": length, "error": tail[0][:80]})
            continue
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"[bench]   {points[-1]}", flush=True)
    op_rows = memory_op_efficiency(args.threads, args.op_baseline)
    print(write_report(points, op_rows, args.out, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
