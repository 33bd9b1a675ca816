"""Loss curve of a distillation run from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        (evals if "eval" in record else steps).append(record)
    return steps, evals


def _running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


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
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
