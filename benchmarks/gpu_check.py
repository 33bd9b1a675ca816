"""GPU check: correctness against the CPU float64 reference, then prefill/decode timings.

    bash benchmarks/gpu_check.sh                       # on a CUDA machine, a few minutes
    python benchmarks/gpu_check.py --smoke --device cpu  # the same code path, tiny, on CPU (CI)

1. Correctness (GPU against CPU float64):
   - the memory op ``chunk_ttt``: eager fp32, ``torch.compile`` fp32, and bf16 autocast;
   - sliding-window + sink attention through FlexAttention (compiled) against ``swa_dense``;
   - a small converted Qwen3 (random weights, non-zero memory): prefill logits, and
     token-by-token decoding against prefill.
2. Timing on Qwen3-0.6B-sized random weights (bf16): full attention (transformers SDPA,
   standard cache) against AllMem (window 4096, 4 sinks, chunk 2048), prefill seconds and
   decode ms/token (median) at 8k ... 128k, peak GPU memory and cache bytes.
Writes gpu_check.json and gpu_check.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_models: small real-family configs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------ correctness
def check_memory_op(device: str, smoke: bool) -> dict:
    from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms, set_compiled

    n, length, d, chunk = (4, 96, 16, 16) if smoke else (36, 4096, 64, 512)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.nn.functional.normalize(torch.randn(n, length, d, generator=g, dtype=torch.float64), dim=-1)
               for _ in range(3))
    eta = torch.full((n, length), 0.1, dtype=torch.float64)
    beta = torch.full((n, length // chunk), 0.5, dtype=torch.float64)
    w0 = FastWeights(*(torch.randn(n, d, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(3)))
    state = TTTState(w0, FastWeights(*(torch.zeros_like(w) for w in w0)))
    args = lambda dev, dt: ([t.to(dev, dt) for t in (q, k, v, eta, beta)],  # noqa: E731
                            TTTState(*(FastWeights(*(w.to(dev, dt) for w in ws)) for ws in state)),
                            FastWeights(*(x.to(dev, dt) for x in row_norms(w0))))
    (tensors, st, norms) = args("cpu", torch.float64)
    ref_o, ref_state = chunk_ttt(*tensors, st, norms, chunk_size=chunk)
    out = {}
    variants = [("fp32 eager", torch.float32, False, False), ("bf16 autocast", torch.float32, False, True)]
    if device.startswith("cuda"):
        variants.insert(1, ("fp32 torch.compile", torch.float32, True, False))
    for name, dtype, compiled, autocast in variants:
        set_compiled(compiled)
        (tensors, st, norms) = args(device, dtype)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            o, final = chunk_ttt(*tensors, st, norms, chunk_size=chunk)
        out[name] = {"output_rel_err": rel_err(o, ref_o), "state_rel_err": rel_err(final.weights.w2, ref_state.weights.w2)}
    set_compiled(False)
    return out


def check_flex_attention(device: str, smoke: bool) -> dict:
    from allmem.ops.swa import swa_dense, swa_flex

    batch, kv, groups, length, dim, window, sinks = (1, 2, 2, 64, 16, 16, 2) if smoke else (2, 4, 4, 2048, 64, 256, 4)
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, q_sink = r(batch, kv, groups, length, dim), r(batch, kv, groups, length, dim)
    k, v = r(batch, kv, length, dim), r(batch, kv, length, dim)
    pos = torch.arange(length)[None].repeat(batch, 1)
    k_sink, v_sink = k[:, :, :sinks].clone(), v[:, :, :sinks].clone()
    sink_pos = torch.arange(sinks)[None].repeat(batch, 1)
    kw = dict(window=window, scale=dim**-0.5)
    ref = swa_dense(q, k, v, pos, pos, q_sink=q_sink, k_sink=k_sink, v_sink=v_sink, sink_pos=sink_pos, **kw)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        to = lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = swa_flex(to(q), to(k), to(v), to(pos), to(pos), q_sink=to(q_sink), k_sink=to(k_sink),
                           v_sink=to(v_sink), sink_pos=to(sink_pos), compiled=device.startswith("cuda"), **kw)
        out[str(dtype).replace("torch.", "")] = rel_err(got, ref)
    return out


def check_model(device: str) -> dict:
    import allmem
    from tiny_models import randomise_memory, tiny_base

    base = tiny_base("qwen3").double()
    model = allmem.convert(base, allmem.AllMemConfig(window=32, sinks=4, chunk=16)).double().eval()
    randomise_memory(model, scale=0.05)
    x = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        model = model.float().to(device)
        xd = x.to(device)
        prefill = model(xd, use_cache=False).logits
        cache = model.new_cache()
        model(xd[:, :100], cache=cache)
        steps = [model(xd[:, t : t + 1], cache=cache).logits for t in range(100, 150)]
    return {"prefill_vs_cpu_float64": rel_err(prefill, ref),
            "decode_vs_prefill": rel_err(torch.cat(steps, 1), prefill[:, 100:])}


# ------------------------------------------------------------------ timing
def qwen3_model(device: str, smoke: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from allmem.cost_report import load_model_config

    if smoke:
        from tiny_models import tiny_base

        return tiny_base("qwen3").to(device)
    fields = {k: v for k, v in load_model_config("qwen3-0.6b").items()
              if k in Qwen3Config().to_dict() or k in ("head_dim",)}
    config = Qwen3Config(**fields, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    return model


def time_point(model, kind: str, length: int, device: str, decode_steps: int, segment: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length + decode_steps + 4), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        if kind == "full":
            out = model(ids[:, :length], use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        else:
            cache = model.new_cache()
            for start in range(0, length, segment):
                model(ids[:, start : min(length, start + segment)], cache=cache, logits_to_keep=1)
        sync(device)
        prefill = time.perf_counter() - t0
        for t in range(decode_steps + 4):
            tok = ids[:, length + t : length + t + 1]
            sync(device)
            t0 = time.perf_counter()
            if kind == "full":
                cache = model(tok, past_key_values=cache, use_cache=True).past_key_values
            else:
                model(tok, cache=cache)
            sync(device)
            if t >= 4:  # the first steps warm up
                times.append(time.perf_counter() - t0)
    if kind == "full":
        cache_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    else:
        cache_bytes = cache.nbytes()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {"system": kind, "length": length, "prefill_s": round(prefill, 3),
            "decode_ms": round(1000 * statistics.median(times), 2), "cache_mib": round(cache_bytes / 2**20, 1),
            "peak_gib": round(peak, 2)}


def timings(device: str, smoke: bool, lengths: list[int], decode_steps: int) -> list[dict]:
    import allmem

    base = qwen3_model(device, smoke)
    rows = []
    for length in lengths:  # full attention first, with the untouched base
        try:
            rows.append(time_point(base, "full", length, device, decode_steps, 0))
        except torch.OutOfMemoryError:
            rows.append({"system": "full", "length": length, "error": "out of memory"})
            torch.cuda.empty_cache()
        print("[gpu_check]", rows[-1], flush=True)
    config = allmem.AllMemConfig(window=32, sinks=4, chunk=16) if smoke else \
        allmem.AllMemConfig(window=4096, sinks=4, chunk=2048)
    model = allmem.convert(base, config).eval()
    dtype = next(base.parameters()).dtype
    model.to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:  # memory on everywhere
            layer.self_attn.alpha.fill_(0.1)
    for length in lengths:
        rows.append(time_point(model, "allmem", length, device, decode_steps, 64 if smoke else 16384))
        print("[gpu_check]", rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs anywhere, for CI)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --smoke to exercise the script", file=sys.stderr)
        return 2
    lengths = [128, 256] if args.smoke else args.lengths
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "smoke": args.smoke}
    report["memory_op"] = check_memory_op(args.device, args.smoke)
    print("[gpu_check] memory op", report["memory_op"], flush=True)
    report["flex_attention"] = check_flex_attention(args.device, args.smoke)
    print("[gpu_check] flex attention", report["flex_attention"], flush=True)
    report["model"] = check_model(args.device)
    print("[gpu_check] model", report["model"], flush=True)
    report["timings"] = timings(args.device, args.smoke, lengths, 4 if args.smoke else args.decode_steps)

    failures = [f"memory op {k}" for k, v in report["memory_op"].items()
                if v["output_rel_err"] > (5e-2 if "bf16" in k else 1e-4)]
    failures += [f"flex {k}" for k, v in report["flex_attention"].items() if v > (2e-2 if "bfloat16" in k else 1e-4)]
    failures += [f"model {k}" for k, v in report["model"].items() if v > 1e-4]
    report["failures"] = failures
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"GPU check on {report['device']} (torch {report['torch']}){' [smoke]' if args.smoke else ''}", "",
             "| check | relative error |", "| --- | ---: |"]
    lines += [f"| memory op, {k} | {v['output_rel_err']:.2e} |" for k, v in report["memory_op"].items()]
    lines += [f"| flex attention, {k} | {v:.2e} |" for k, v in report["flex_attention"].items()]
    lines += [f"| model, {k} | {v:.2e} |" for k, v in report["model"].items()]
    lines += ["", "| system | tokens | prefill s | decode ms/token | cache MiB | peak GiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["timings"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['length']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['system']} | {r['length']} | {r['prefill_s']} | {r['decode_ms']} | {r['cache_mib']} | "
                         f"{r['peak_gib']} |")
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
