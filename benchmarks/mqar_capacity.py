"""What one *untrained* AllMem memory head stores: MQAR-shaped writes, then reads (seconds on CPU).

No outer loop: keys are random unit vectors (times qk_scale), values random with unit-variance
entries, the fast weights start from the spec's initialisation. Per memory head:

    P pair tokens write (key_i -> value_i)      (the association a trained conv + projections would form)
    G filler tokens write random (key, value)   (untrained eta cannot skip them: every token writes)
    P queries read key_i, one chunk after the last write

Scored: top-1, whether the read is nearest (cosine) to its own value among the P values (what
a tied LM head over the value tokens would need), and |write's change of the read| / |read|.

    .venv/bin/python benchmarks/mqar_capacity.py [--out docs/mqar]   # writes capacity.md / .json
    .venv/bin/python benchmarks/mqar_capacity.py --retention --out docs/mqar/session3   # retention.md
    .venv/bin/python benchmarks/mqar_capacity.py --retention weight_norm --fillers 64 224 640 \
        --out docs/distill/recall/retention
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms


def probe(*, residual=True, qk_scale=1.0, base_lr=0.1, clip=1.0, chunk=32, expansion=1, loss="mse",
          momentum=0.5, weight_norm=True, pairs=16, filler=64, d=64, memories=32, seed=0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    n, f = memories, expansion * d
    w0 = FastWeights(torch.randn(n, f, d, generator=g) / math.sqrt(d),
                     torch.randn(n, d, f, generator=g) / math.sqrt(f) * 0.1,
                     torch.randn(n, f, d, generator=g) / math.sqrt(d))
    writes = pairs + filler
    length = -(-writes // chunk) * chunk + chunk  # reads sit in the chunk after the last write
    k = F.normalize(torch.randn(n, length, d, generator=g), dim=-1) * qk_scale
    v = torch.randn(n, length, d, generator=g)
    eta = torch.zeros(n, length)
    eta[:, :writes] = base_lr
    q = torch.zeros(n, length, d)
    start = length - chunk
    q[:, start:start + pairs] = k[:, :pairs]
    beta = torch.full((n, length // chunk), momentum)
    zeros = FastWeights(*(torch.zeros_like(w) for w in w0))

    def run(lr_scale):
        norms = row_norms(w0) if weight_norm else None
        o, _ = chunk_ttt(q, k, v, eta * lr_scale, beta, TTTState(w0, zeros), norms, chunk_size=chunk,
                         loss=loss, clip=clip, residual=residual)
        return o[:, start:start + pairs]

    read, untouched = run(1.0), run(0.0)
    if not torch.isfinite(read).all():  # the fast weights diverged (no weight norm and no clip can)
        return {"top1": float("nan"), "cos": float("nan"), "write_share": float("nan")}
    values = v[:, :pairs]
    sims = F.normalize(read, dim=-1) @ F.normalize(values, dim=-1).mT  # [n, P, P]
    return {
        "top1": (sims.argmax(-1) == torch.arange(pairs)).float().mean().item(),
        "cos": F.cosine_similarity(read, values, dim=-1).mean().item(),
        "write_share": ((read - untouched).norm(dim=-1) / read.norm(dim=-1).clamp_min(1e-12)).mean().item(),
    }


GRID = {  # one factor at a time around two anchors: the spec and the skip-free memory
    "residual": [True, False],
    "qk_scale": [1.0, 8.0],
    "base_lr": [0.1, 0.3, 1.0],
    "clip": [1.0, None, 10.0],
    "chunk": [32, 64],
    "expansion": [1, 2],
    "loss": ["mse", "dot"],
    "momentum": [0.5, 0.9],
    "weight_norm": [True, False],
}


RETENTION_GRIDS = {  # the factors crossed by --retention, and what the rest stay at
    "qk": ({"qk_scale": (1.0, 2.0, 4.0, 8.0), "base_lr": (0.1, 0.3, 1.0), "momentum": (0.5, 0.9)}, "clip 1.0, weight norm"),
    "weight_norm": ({"weight_norm": (True, False), "clip": (1.0, None), "base_lr": (0.1, 0.3, 1.0), "momentum": (0.5, 0.9)},
                    "qk_scale 1"),
}


def retention(out: Path, fillers: list[int], grid: str) -> None:
    """The skip-free memory's top-1 after G filler writes over a grid of write settings: how fast
    writes erase what came before (qk_scale, base_lr and momentum set the write size together;
    the weight norm and the clip decide whether a stored pair stops being rewritten)."""
    factors, rest = RETENTION_GRIDS[grid]
    lines = ["# Retention of an untrained skip-free memory head (benchmarks/mqar_capacity.py --retention)", "",
             "16 key -> value writes, G filler writes, then the 16 keys read one chunk later; top-1 = the read is "
             "nearest its own value among the 16 (chance 0.0625; nan = the fast weights diverged). read_residual=False, "
             f"d_h 64, chunk 32, e 1, mse, {rest}.", "", "| " + " | ".join(factors) + " | " + " | ".join(f"top-1 G={g}" for g in fillers) + " |",
             "|---" * (len(factors) + len(fillers)) + "|"]
    for values in itertools.product(*factors.values()):
        setting = dict(zip(factors, values))
        top1 = [probe(residual=False, **setting, filler=g)["top1"] for g in fillers]
        lines.append("| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + " | "
                     + " | ".join(f"{t:.3f}" for t in top1) + " |")
        print(lines[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retention.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/mqar")
    parser.add_argument("--fillers", nargs="+", type=int, default=[0, 64, 224])
    parser.add_argument("--retention", choices=sorted(RETENTION_GRIDS), nargs="?", const="qk", default=None,
                        help="a grid of the skip-free memory's write settings instead (retention.md): qk (the "
                             "default) = qk_scale x base_lr x momentum, weight_norm = weight norm x clip x base_lr x momentum")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.retention:
        retention(Path(args.out), [g for g in args.fillers if g] or [64, 224], args.retention)
        return
    rows = []
    anchors = {"spec": dict(residual=True), "skip-free": dict(residual=False)}
    for (anchor, base), (factor, options) in itertools.product(anchors.items(), GRID.items()):
        for option in options:
            setting = {**base, factor: option}
            if factor == "residual" and option != base["residual"]:
                continue
            name = f"{anchor}: {factor}={option}"
            if any(r["name"] == name for r in rows):
                continue
            cells = {fill: probe(**setting, filler=fill) for fill in args.fillers}
            rows.append({"name": name, "setting": {k: v for k, v in setting.items()}, "cells": cells})
            print(name, {fill: round(c["top1"], 3) for fill, c in cells.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    head = " | ".join(f"top1 G={fill} | write share G={fill}" for fill in args.fillers)
    lines = ["# Untrained memory head: 16 key->value writes, G filler writes, then 16 reads (benchmarks/mqar_capacity.py)",
             "", "top1: read nearest its own value among the 16 (chance 0.0625); write share: |change of the read due "
             "to the writes| / |read|. Defaults: d_h 64, chunk 32, e 1, mse, base_lr 0.1, clip 1.0, momentum 0.5, "
             "qk_scale 1; 'spec' keeps the skip (f = z + W2 h), 'skip-free' is read_residual=False.", "",
             f"| setting | {head} |", "|---" * (1 + 2 * len(args.fillers)) + "|"]
    for r in rows:
        cells = " | ".join(f"{r['cells'][fill]['top1']:.3f} | {r['cells'][fill]['write_share']:.4f}" for fill in args.fillers)
        lines.append(f"| {r['name']} | {cells} |")
    (out / "capacity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
