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


def plot_loss_curve(metrics: str | Path, out_png: str | Path, smooth: int = 5) -> Path:
    """Per-step KL (and its running mean over ``smooth`` steps), with the drawn window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, _ = read_metrics(metrics)
    xs = [r["step"] for r in steps]
    kl = [r["kl"] for r in steps]
    mean = [sum(kl[max(0, i - smooth + 1) : i + 1]) / len(kl[max(0, i - smooth + 1) : i + 1]) for i in range(len(kl))]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(xs, kl, ".", alpha=0.4, label="KL(teacher || student) per step")
    ax.plot(xs, mean, "-", label=f"running mean ({smooth} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / scored token")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(xs, [r.get("window", 0) for r in steps], "k:", alpha=0.3, label="window W drawn")
    ax2.set_ylabel("window")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
