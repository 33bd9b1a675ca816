"""Plots of distillation runs from their metrics.jsonl: one run's loss curve, or several runs'
held-out perplexity and recall margin side by side.

    python -m allmem.distill.report curves out/recall-v11/metrics.jsonl docs/distill/recall/v11/curves.png
    python -m allmem.distill.report compare v10=docs/distill/recall/v10/metrics.jsonl \
        v11=out/recall-v11/metrics.jsonl --out docs/distill/recall/heldout.png
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        (evals if "eval" in record else steps).append(record)
    return steps, evals


def run_totals(path: str | Path) -> dict:
    """Steps, tokens and hours of a run from its metrics.jsonl. A step logged twice (files
    written before resumes dropped the replayed steps) counts once, its last record; hours sum
    the segments where ``elapsed_s`` restarted (such a file's clock restarted at each resume)."""
    steps, _ = read_metrics(path)
    last = {r["step"]: r for r in steps}
    seconds, previous = 0.0, 0.0
    for record in steps:
        elapsed = record.get("elapsed_s", 0.0)
        if elapsed < previous:
            seconds += previous
        previous = elapsed
    return {"steps": len(last), "tokens": sum(r["tokens"] for r in last.values()),
            "hours": (seconds + previous) / 3600}


def _running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def _save(fig, out_png: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_loss_curve(metrics: str | Path, out_png: str | Path, smooth: int = 5) -> Path:
    """Per-step KL by data source (with running means over ``smooth`` steps of each source)
    and the drawn window; when the run logged recall margins, a panel with them (AllMem over
    evaluations, SWA + sinks and full attention as references); when it logged write-gate ratios
    (train.lambda_gate), a panel with the answer CE and the gate ratio of each recall source; when it
    logged attention-transfer errors (train.lambda_transfer), a panel with them per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(metrics)
    margins = [(r["step"], r["eval"]) for r in evals if "margin_allmem" in r["eval"]]
    gated = any("gate_log10_ratio" in r for r in steps)
    transferred = any("transfer_error" in r for r in steps)
    panels = 1 + bool(margins) + bool(gated) + transferred
    fig, axes = plt.subplots(panels, 1, figsize=(8, 0.5 + 3.6 * panels), squeeze=False)
    ax = axes[0][0]
    by_source: dict[str, list[dict]] = {}
    for r in steps:
        by_source.setdefault(r.get("source", "all"), []).append(r)
    for source, rows in sorted(by_source.items()):
        xs, kl = [r["step"] for r in rows], [r["kl"] for r in rows]
        (line,) = ax.plot(xs, _running_mean(kl, smooth), "-", label=f"{source} (running mean, {smooth})")
        ax.plot(xs, kl, ".", alpha=0.35, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student), nats / scored token")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in steps], [r.get("window", 0) for r in steps], "k:", alpha=0.3, label="window W drawn")
    ax2.set_ylabel("window")
    ax.legend(loc="upper right", fontsize=7)
    ax.grid(alpha=0.3)
    if margins:
        ax = axes[1][0]
        xs = [s for s, _ in margins]
        ax.plot(xs, [e["margin_allmem"] for _, e in margins], "o-", label="AllMem")
        for key, label, style in (("margin_full", "full attention", "g--"), ("margin_swa", "SWA + sinks", "r--")):
            if key in margins[-1][1]:
                ax.axhline(margins[-1][1][key], linestyle="--", color=style[0], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("recall margin, nats")
        ax.set_title("held-out passkey / multi-key: log p(right) - log p(wrong answer of the same form)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if gated:
        ax = axes[1 + bool(margins)][0]
        ax2 = ax.twinx()
        for source, rows in sorted(by_source.items()):
            rows = [r for r in rows if "gate_log10_ratio" in r]
            if not rows:
                continue
            xs = [r["step"] for r in rows]
            (line,) = ax.plot(xs, _running_mean([r["ce"] for r in rows], smooth), "-", label=f"{source} answer CE")
            ax2.plot(xs, _running_mean([r["gate_log10_ratio"] for r in rows], smooth), ":", color=line.get_color())
        ax.set_xlabel("step")
        ax.set_ylabel(f"answer CE, nats / token (solid; running mean, {smooth})")
        ax2.set_ylabel("log10 needle / filler write rate (dotted)")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    if transferred:
        ax = axes[-1][0]
        for source, rows in sorted(by_source.items()):
            rows = [r for r in rows if "transfer_error" in r]
            if rows:
                ax.plot([r["step"] for r in rows], _running_mean([r["transfer_error"] for r in rows], smooth), "-",
                        label=source)
        ax.set_xlabel("step")
        ax.set_ylabel(f"attention-transfer error (running mean, {smooth})")
        ax.set_title("per layer ||window + alpha * memory - full attention||^2 / ||full attention||^2, mean", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_heldout_runs(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """Held-out perplexity and recall margin against the step for several runs (label -> metrics.jsonl),
    with SWA + sinks and full attention as horizontal references (from the first run that logged
    them). Runs that share a held-out set (same recipe seed) are comparable point by point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_margin) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    references: dict[str, float] = {}
    for label, path in runs.items():
        _, evals = read_metrics(path)
        if not evals:
            raise ValueError(f"{path} has no held-out evaluations (train.eval_every was 0): nothing to plot for {label}")
        xs = [r["step"] for r in evals]
        ax_ppl.plot(xs, [r["eval"]["allmem_ppl"] for r in evals], "o-", label=f"AllMem {label}")
        if "margin_allmem" in evals[0]["eval"]:
            ax_margin.plot(xs, [r["eval"]["margin_allmem"] for r in evals], "o-", label=f"AllMem {label}")
        for key in ("swa_ppl", "full_ppl", "margin_swa", "margin_full"):
            if key in evals[-1]["eval"]:
                references.setdefault(key, evals[-1]["eval"][key])
    for ax, prefix, kind in ((ax_ppl, "", "ppl"), (ax_margin, "margin_", "margin")):
        for name, label, colour in (("swa", "SWA + sinks", "r"), ("full", "full attention", "g")):
            key = f"{prefix}{name}" if prefix else f"{name}_ppl"
            if key in references:
                ax.axhline(references[key], linestyle="--", color=colour, label=f"{label} ({references[key]:.2f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_ppl.set_ylabel("held-out perplexity (scored tokens)")
    ax_margin.set_ylabel("recall margin, nats")
    ax_margin.set_xlabel("step")
    ax_margin.set_title("held-out passkey / multi-key: log p(right) - log p(wrong answer of the same form)", fontsize=9)
    return _save(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m allmem.distill.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("curves", help="one run's loss curve (KL per source, margins, gates, transfer)")
    p.add_argument("metrics", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("compare", help="several runs' held-out perplexity and recall margin")
    p.add_argument("runs", nargs="+", metavar="LABEL=METRICS")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "curves":
            print(plot_loss_curve(args.metrics, args.out))
        else:
            bad = [r for r in args.runs if "=" not in r]
            if bad:
                parser.error(f"runs look like LABEL=PATH/metrics.jsonl, got {bad[0]!r}")
            print(plot_heldout_runs(dict(r.split("=", 1) for r in args.runs), args.out))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
