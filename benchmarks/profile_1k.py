"""Where AllMem's time goes at short context: a 1k-token prefill and one decode token of the
real SmolLM2, AllMem-256 (4 sinks, chunk 128, memory on) beside full attention, same process.

Two views per system and phase: wall time per component (forward hooks on the memory, the
whole token mixer, the MLP; the rest is embeddings, norms, LM head and Python) and
torch.profiler's top operators by self CPU time. Writes benchmarks/results/profile_1k.txt.
With --compiled, AllMem also runs under ``allmem.set_compiled(True)`` (torch.compile of the
memory's decode read and per-chunk step; compiled in a warm-up, not timed). The component hooks
keep a decode token off the fused steady path (``allmem.modeling.decode_block`` steps aside for a
hooked layer), so the decode rows here profile the general path (``benchmarks/short_context.py``
times the fused one).

    nice -n 19 .venv/bin/python benchmarks/profile_1k.py [--threads 2] [--length 1024] [--compiled]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import allmem
from allmem.corpus import long_document


class ComponentTimer:
    """Wall time spent inside modules, summed per component name (nested components overlap)."""

    def __init__(self, modules: dict[str, list[torch.nn.Module]]):
        self.seconds: dict[str, float] = defaultdict(float)
        self.handles = []
        for name, mods in modules.items():
            for mod in mods:
                self.handles.append(mod.register_forward_pre_hook(self._enter(name, mod)))
                self.handles.append(mod.register_forward_hook(self._leave(name, mod)))
        self.started: dict[int, float] = {}

    def _enter(self, name, mod):
        def hook(*_):
            self.started[id(mod)] = time.perf_counter()
        return hook

    def _leave(self, name, mod):
        def hook(*_):
            self.seconds[name] += time.perf_counter() - self.started.pop(id(mod))
        return hook

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def components(model, allmem_model: bool) -> dict[str, list[torch.nn.Module]]:
    layers = model.model.layers
    out = {"token mixer (attention or SWA + memory)": [layer.self_attn for layer in layers],
           "mlp": [layer.mlp for layer in layers]}
    if allmem_model:
        out["  of which memory"] = [layer.self_attn.memory for layer in layers]
    return out


def prefill_and_decode(model, is_allmem: bool, prompt: torch.Tensor, follow: torch.Tensor):
    """prefill() -> a cache holding ``prompt``; decode(cache, t) feeds token t of ``follow``. ``model``:
    the base with its standard cache, or (``is_allmem``) the converted model with its constant cache."""
    if is_allmem:

        def prefill():
            cache = model.new_cache()
            model(prompt, cache=cache, logits_to_keep=1)
            return cache

        def decode(cache, t):
            model(follow[:, t : t + 1], cache=cache)
    else:
        def prefill():
            return model(prompt, use_cache=True, logits_to_keep=1).past_key_values

        def decode(cache, t):
            model(follow[:, t : t + 1], past_key_values=cache, use_cache=True)
    return prefill, decode


def run_system(system: str, model, prompt, follow, repeats: int) -> tuple[str, dict]:
    """Component table and operator table for prefill and decode of one system (``model``: the
    base for "full", else the converted model)."""
    is_allmem = system != "full"
    allmem.set_compiled(system.endswith("compiled"))
    prefill, decode = prefill_and_decode(model, is_allmem, prompt, follow)
    timer = ComponentTimer(components(model, is_allmem))
    sections, summary = [], {}
    with torch.no_grad():
        decode(prefill(), 0)  # warm-up (and compilation)
        for phase in ("prefill", "decode"):
            walls, parts = [], defaultdict(list)
            for r in range(repeats):
                cache = prefill() if phase == "decode" else None
                timer.reset()
                t0 = time.perf_counter()
                if phase == "prefill":
                    prefill()
                else:
                    decode(cache, r)
                walls.append(time.perf_counter() - t0)
                for name, s in timer.seconds.items():
                    parts[name].append(s)
            wall = statistics.median(walls)
            summary[phase] = wall
            lines = [f"{system} {phase}: {1000 * wall:.1f} ms (median of {repeats})"]
            for name, vals in parts.items():
                s = statistics.median(vals)
                lines.append(f"  {name:<42} {1000 * s:8.1f} ms  {100 * s / wall:5.1f} %")
            cache = prefill() if phase == "decode" else None
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                if phase == "prefill":
                    prefill()
                else:
                    decode(cache, 0)
            lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
            sections.append("\n".join(lines))
    timer.remove()
    allmem.set_compiled(False)
    return "\n\n".join(sections), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also AllMem under allmem.set_compiled(True)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_1k.txt")
    args = parser.parse_args()
    if args.length < 1 or args.repeats < 1:
        parser.error("--length and --repeats must be positive")
    torch.set_num_threads(args.threads)
    base, tok = allmem.load_base("smollm2")
    ids = tok(long_document(), return_tensors="pt").input_ids
    while ids.shape[1] < args.length + args.repeats + 1:
        ids = torch.cat([ids, ids], dim=1)
    prompt, follow = ids[:, : args.length], ids[:, args.length :]
    texts, walls = [], {}
    systems = ("full", "allmem-256", "allmem-256-compiled") if args.compiled else ("full", "allmem-256")
    converted = None
    for system in systems:
        if system != "full" and converted is None:  # convert() takes the base's layers: once, after "full"
            converted = allmem.convert(base, allmem.AllMemConfig(window=256, sinks=4, chunk=128)).eval()
            for layer in converted.model.layers:
                layer.self_attn.alpha.data.fill_(0.1)
        text, walls[system] = run_system(system, base if system == "full" else converted, prompt, follow, args.repeats)
        texts.append(text)
    head = [f"{args.length} tokens, {args.threads} threads, torch {torch.__version__}"]
    for phase in ("prefill", "decode"):
        for system in systems[1:]:
            head.append(f"{phase}: {system} / full = {walls[system][phase] / walls['full'][phase]:.2f}")
    args.out.write_text("\n".join(head) + "\n\n" + "\n\n".join(texts) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
