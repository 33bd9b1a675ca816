"""AllMem vs vLLM's own full-attention SmolLM2 on the same vLLM engine (issue 11's table).

Two stages:

* ``run`` (under the vLLM interpreter, .venv-vllm): one engine, ``LLM(DIR)``, ``--batch``
  concurrent random prompts of ``--tokens`` tokens each, greedy, ``--max-new`` new tokens
  each; prints one JSON line: start-up, prefill (first scheduling -> last first token, from
  vLLM's per-request engine timestamps), decode tokens/s (tokens after each request's first
  / (last token - last first token), all requests decoding together), peak resident memory
  of this process and the engine's processes (sampled every 0.1 s while generating) and
  the per-request cache (AllMem: its constant state; full attention: K/V of every token).
* ``all`` (any interpreter): exports ``smollm2-allmem`` once (``allmem export``, project
  venv), then runs ``run`` once per (length, model) in a fresh process, the two models
  alternating at each length, and writes ``--out``.json/.md.

vLLM on CPU allocates its whole KV/state pool (``VLLM_CPU_KVCACHE_SPACE`` GiB) at start-up,
so the resident memory follows the pool size: each run gets the smallest whole number of GiB
that holds its batch (AllMem: 1 GiB for any length), which is what a server would have to
reserve for that workload.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vllm_bench.py all --tokens 8192,16384 \\
        --out benchmarks/results/vllm_bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / "out" / "vllm-bench"
GiB = 2**30


def cache_bytes_per_request(model_dir: str, tokens: int) -> tuple[str, int]:
    """(kind, bytes) one request holds between steps at ``tokens`` tokens."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    if config.get("model_type") == "allmem":
        from allmem.serving.vllm_model import state_numel  # needs vLLM: the run stage only

        return "allmem", layers * state_numel(SimpleNamespace(**config)) * 4
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return "full", 2 * layers * config["num_key_value_heads"] * head_dim * 4 * tokens


class PeakRSS:
    """Highest summed resident memory of this process and its children while running."""

    def __init__(self, period: float = 0.1):
        import psutil

        self.me, self.period, self.peak, self._stop = psutil.Process(), period, 0, threading.Event()

    def sample(self) -> int:
        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a child that just exited
                pass
        self.peak = max(self.peak, total)
        return total

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def run(model_dir: str, batch: int, tokens: int, max_new: int, max_batched: int) -> dict:
    from allmem.serving.vllm_plugin import register

    register()  # the entry point does it too; harmless twice
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(tokens)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(tokens)]) for _ in range(batch)]
    start = time.perf_counter()
    llm = LLM(model=model_dir, enforce_eager=True, dtype="float32", max_model_len=tokens + max_new + 16,
              max_num_batched_tokens=max_batched, max_num_seqs=batch, enable_prefix_caching=False, seed=0,
              disable_log_stats=False)  # per-request engine timestamps (RequestOutput.metrics)
    startup = time.perf_counter() - start
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(temperature=0.0, max_tokens=2))
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    with PeakRSS() as rss:
        idle = rss.sample()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        total = time.perf_counter() - start
    if any(len(o.outputs[0].token_ids) != max_new for o in outs):
        raise RuntimeError("a request stopped early")
    m = [o.metrics for o in outs]
    prefill = max(x.first_token_ts for x in m) - min(x.scheduled_ts for x in m)
    decode_span = max(x.last_token_ts for x in m) - max(x.first_token_ts for x in m)
    decode_tokens = batch * (max_new - 1)
    kind, per_request = cache_bytes_per_request(model_dir, tokens + max_new)
    return {"model": kind, "dir": model_dir, "batch": batch, "prompt_tokens": tokens, "max_new": max_new,
            "max_num_batched_tokens": max_batched, "pool_gib": int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", 0)),
            "startup_s": round(startup, 1), "prefill_s": round(prefill, 2), "total_s": round(total, 2),
            "prefill_tok_s": round(batch * tokens / prefill, 1),
            "decode_tok_s": round(decode_tokens / max(decode_span, 1e-9), 2),
            "rss_idle_gib": round(idle / GiB, 2), "rss_peak_gib": round(rss.peak / GiB, 2),
            "cache_per_request_mib": round(per_request / 2**20, 1)}


def pool_gib(per_request: int, batch: int) -> int:
    """The smallest whole pool (GiB) holding the batch's caches, with room for vLLM's rounding."""
    return max(1, math.ceil(batch * per_request * 1.1 / GiB))


def full_kv_bytes(model_dir: Path, tokens: int) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4 * tokens


def table(rows: list[dict]) -> str:
    lines = ["| model | batch × prompt | pool GiB | prefill s | prefill tok/s | decode tok/s | peak RSS GiB | "
             "cache per request MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} × {r['prompt_tokens']} | | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} × {r['prompt_tokens']} | {r['pool_gib']} | {r['prefill_s']} | "
                     f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['rss_peak_gib']} | "
                     f"{r['cache_per_request_mib']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "all"])
    parser.add_argument("--model-dir", help="run: the folder vLLM loads")
    parser.add_argument("--batch", type=int, default=4, help="concurrent requests")
    parser.add_argument("--tokens", default="8192", help="prompt tokens (all: comma-separated lengths)")
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--max-batched", type=int, default=2048, help="vLLM max_num_batched_tokens")
    parser.add_argument("--models", default="allmem,full", help="all: which models, in this order at each length")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="all: where the AllMem export goes")
    parser.add_argument("--full-dir", type=Path, default=Path.home() / ".cache" / "allmem" / "smollm2",
                        help="all: the base SmolLM2 as a Hugging Face folder (vLLM's own Llama)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--timeout", type=float, default=3600, help="all: seconds per run")
    parser.add_argument("--out", type=Path, help="all: write OUT.json and OUT.md")
    args = parser.parse_args()
    if args.stage == "run":
        print(json.dumps(run(args.model_dir, args.batch, int(args.tokens), args.max_new, args.max_batched)), flush=True)
        return 0

    lengths = [int(n) for n in args.tokens.split(",")]
    longest = max(lengths) + args.max_new + 16
    export = args.work / "smollm2-allmem"
    if "allmem" in args.models and not (export / "config.json").is_file():
        subprocess.run([args.project_python, "-m", "allmem.cli", "export", "--model", "smollm2-allmem", "--out",
                        str(export), "--max-model-len", str(max(longest, 8192))], check=True)
    rows = []
    for tokens in lengths:
        for kind in args.models.split(","):
            model_dir = export if kind == "allmem" else args.full_dir
            per_request = full_kv_bytes(model_dir, tokens + args.max_new) if kind == "full" else 0
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(pool_gib(per_request, args.batch)),
                       VLLM_CPU_OMP_THREADS_BIND="nobind",
                       VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")  # SmolLM2's config says 8192; speed only beyond
            cmd = [args.vllm_python, __file__, "run", "--model-dir", str(model_dir), "--batch", str(args.batch),
                   "--tokens", str(tokens), "--max-new", str(args.max_new), "--max-batched", str(args.max_batched)]
            print(f"[{kind} {args.batch} x {tokens}: {' '.join(cmd[1:])}]", file=sys.stderr, flush=True)
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(line[-1]) if done.returncode == 0 and line else {
                    "model": kind, "batch": args.batch, "prompt_tokens": tokens,
                    "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
            except subprocess.TimeoutExpired:
                row = {"model": kind, "batch": args.batch, "prompt_tokens": tokens,
                       "error": f"over {args.timeout:.0f} s"}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
                args.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
