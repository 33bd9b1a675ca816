"""Run plots from metrics.jsonl: one run's curves and several runs' held-out comparison."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from allmem.distill.report import main, plot_heldout_runs, plot_loss_curve


def write_metrics(path, steps=12, evals=(4, 8, 12), margin_gain=1.0):
    lines = []
    for step in range(1, steps + 1):
        source = "task/passkey" if step % 2 else "text/essays"
        record = {"step": step, "kl": 1.0 / step, "ce": 2.0 - 0.1 * step, "source": source, "window": 32 + step,
                  "tokens": 100, "transfer_error": 0.5 / step}
        if source.startswith("task"):
            record["gate_log10_ratio"] = 0.2 * step
        lines.append(record)
        if step in evals:
            lines.append({"step": step, "eval": {"allmem_ppl": 20.0 - step / 2, "swa_ppl": 13.6, "full_ppl": 10.6,
                                                  "margin_allmem": margin_gain * step, "margin_swa": 0.05,
                                                  "margin_full": 13.4}})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_plots_are_drawn_with_every_panel(tmp_path):
    one = write_metrics(tmp_path / "a.jsonl")
    curves = plot_loss_curve(one, tmp_path / "curves.png")
    with Image.open(curves) as image:
        width, height = image.size
    assert width > 0 and height > 3 * 300  # KL, margins, gates and transfer: four panels of ~3.6 inches
    other = write_metrics(tmp_path / "b.jsonl", margin_gain=0.5)
    compared = plot_heldout_runs({"a": one, "b": other}, tmp_path / "compare.png")
    with Image.open(compared) as image:
        assert image.size[0] > 0


def test_the_command_line_draws_and_refuses_runs_without_evaluations(tmp_path, capsys):
    run = write_metrics(tmp_path / "a.jsonl")
    assert main(["compare", f"v1={run}", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    no_evals = write_metrics(tmp_path / "none.jsonl", evals=())
    assert main(["compare", f"v1={run}", f"v2={no_evals}", "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no held-out evaluations" in err and "v2" in err
    assert not (tmp_path / "d.png").exists()
    assert main(["curves", str(tmp_path / "missing.jsonl"), str(tmp_path / "e.png")]) == 2
    with pytest.raises(SystemExit) as usage:
        main(["compare", str(run), "--out", str(tmp_path / "f.png")])
    assert usage.value.code == 2 and "LABEL=PATH" in capsys.readouterr().err
