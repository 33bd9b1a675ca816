"""The MQAR probe: the generator's layout, tiny end-to-end runs of every mixer, the CLI's errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from allmem.eval import mqar
from allmem.eval.mqar import MIXERS, MQARError, ProbeConfig, multiquery_ar, training_points, with_settings
from test_eval_cli import run

VOCAB = 512
TINY = dict(d_model=64, head_dim=32, intermediate=64, vocab=64, window=16, chunk=8, steps=3, budget_s=60,
            batch=4, warmup=1, eval_examples=8, eval_every=2)


@pytest.mark.parametrize("seq_len,pairs,gap", [(128, 8, 64), (256, 16, 64), (100, 5, 30), (64, 4, 0)])
def test_every_answer_is_the_value_paired_with_the_queried_key(seq_len, pairs, gap):
    x, y = multiquery_ar(64, seq_len, pairs, vocab_size=VOCAB, min_gap=gap, seed=3)
    assert x.shape == y.shape == (64, seq_len) and x.dtype == y.dtype == torch.long
    context = 2 * pairs
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:context:2], row_x[1:context:2]
        assert all(1 <= k < VOCAB // 2 for k in keys) and all(VOCAB // 2 <= v < VOCAB for v in values)
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        table = dict(zip(keys, values))
        answers = [t for t, label in enumerate(row_y) if label != -100]
        assert len(answers) == pairs  # every key is asked once by default
        assert sorted(row_x[t] for t in answers) == sorted(keys)
        for t in answers:
            assert t >= context + gap
            assert row_y[t] == table[row_x[t]]
        assert all(label == -100 for t, label in enumerate(row_y) if t not in answers)
        assert min(b - a for a, b in zip(answers, answers[1:])) >= 2


def test_seeds_reproduce_and_differ():
    a = multiquery_ar(8, 128, 8, seed=1)
    b = multiquery_ar(8, 128, 8, seed=1)
    c = multiquery_ar(8, 128, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_num_queries_and_query_positions_spread_over_the_allowed_range():
    x, y = multiquery_ar(256, 200, 10, vocab_size=VOCAB, min_gap=50, num_queries=3, seed=0)
    positions = (y != -100).nonzero()[:, 1]
    assert ((y != -100).sum(1) == 3).all()
    assert positions.min() == 70 and positions.max() >= 190  # first and last even slots get used


def test_more_queries_than_pairs_ask_every_key_and_filler_never_repeats_a_key():
    x, y = multiquery_ar(64, 256, 8, vocab_size=128, min_gap=64, num_queries=40, seed=5)
    assert ((y != -100).sum(1) == 40).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:16:2], row_x[1:16:2]
        table = dict(zip(keys, values))
        answers = [t for t, label in enumerate(row_y) if label != -100]
        assert {row_x[t] for t in answers} == set(keys)  # every key asked, some again
        assert all(row_y[t] == table[row_x[t]] for t in answers)
        filler = [tok for t, tok in enumerate(row_x) if t >= 16 and t not in answers]
        assert not set(filler) & set(keys)
    # Zoology's filler (whole vocabulary) does repeat keys at this vocabulary size
    x, y = multiquery_ar(64, 256, 8, vocab_size=128, min_gap=64, key_free_filler=False, seed=5)
    keys = x[:, 0:16:2]
    filler = x[:, 16:].masked_fill(y[:, 16:] != -100, 0)
    assert (filler[:, :, None] == keys[:, None, :]).any()


def test_training_queries_setting():
    cfg = ProbeConfig(window=64)
    assert mqar.num_queries(128, 8, cfg) == 8  # one per pair (Zoology)
    assert mqar.num_queries(128, 8, mqar.with_settings(cfg, {"queries": 0})) == 24  # every free even slot
    assert mqar.num_queries(128, 8, mqar.with_settings(cfg, {"queries": 12})) == 12
    assert mqar.with_settings(cfg, {"key_free_filler": False}).settings()["key_free_filler"] is False


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=100, num_kv_pairs=16, min_gap=64), "too short"),
    (dict(seq_len=100, num_kv_pairs=8, min_gap=64, num_queries=12), "too short"),
    (dict(seq_len=256, num_kv_pairs=40, vocab_size=64), "too few keys"),
])
def test_impossible_layouts_are_refused(kwargs, match):
    with pytest.raises(MQARError, match=match):
        multiquery_ar(2, **kwargs)


def test_state_sizes_match_and_only_the_swa_memory_is_frozen():
    cfg = ProbeConfig(**{**TINY, "memory": {"expansion": 2}})
    models = {m: mqar.build_model(m, cfg, 64) for m in MIXERS}
    # TTT: 2 heads x 3 matrices x 32 x (2 * 32); Mamba-2 sized to the same number of floats
    assert mqar.recurrent_state_floats(models["allmem"]) == 2 * 3 * 32 * 64
    assert mqar.recurrent_state_floats(models["mamba2"]) == 2 * 3 * 32 * 64
    assert mqar.recurrent_state_floats(models["full"]) is None
    assert all(p.requires_grad for m in ("full", "allmem", "mamba2") for p in models[m].parameters())
    swa = models["swa"]
    frozen = {n for n, p in swa.named_parameters() if not p.requires_grad}
    assert frozen == set(swa.memory_parameters()) and frozen
    assert all(float(layer.self_attn.alpha.abs().max()) == 0 for layer in swa.model.layers)
    assert all(float(layer.self_attn.alpha.detach().min()) == cfg.alpha_init for layer in models["allmem"].model.layers)


def test_every_mixer_trains_end_to_end_writes_outputs_and_resumes(tmp_path, monkeypatch):
    cfg = ProbeConfig(**TINY)
    lines = []
    records = mqar.run_grid(list(MIXERS), [(40, 4)], cfg, tmp_path, progress=False, log=lines.append)
    assert len(records) == 4 and len(lines) == 4
    for r in records:
        assert r["steps"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
    md = (tmp_path / "mqar.md").read_text()
    for mixer in MIXERS:
        assert f"| {mixer} |" in md
    assert "| mixer | 40:4 |" in md
    assert (tmp_path / "mqar.png").stat().st_size > 1000
    assert (tmp_path / "mqar_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "mqar.json").read_text())["results"]
    assert len(saved) == 4

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(mqar, "train_point", no_training)
    again = mqar.run_grid(["allmem", "full"], [(40, 4)], cfg, tmp_path, progress=False, plot=False, log=lines.append)
    assert {(r["mixer"], r["accuracy"]) for r in again} <= {(r["mixer"], r["accuracy"]) for r in records}
    with pytest.raises(AssertionError, match="trained again"):  # other settings are a new point
        mqar.run_grid(["allmem"], [(40, 4)], mqar.with_settings(cfg, {"base_lr": 0.5}), tmp_path, progress=False)




def test_cli_sweep_runs_and_writes_the_table(tmp_path):
    argv = ["eval", "mqar", "--grid", "40:4", "--d-model", "64", "--window", "16", "--chunk", "8", "--steps", "2",
            "--eval-examples", "4", "--out", str(tmp_path), "--quiet",
            "--set", "vocab=64", "head_dim=32", "batch=2", "--sweep", "default", "base_lr=1.0,clip=none"]
    # head_dim is not a --set key (neither a training key nor an AllMemConfig field): one error line
    assert run(*argv) == 2
    argv.remove("head_dim=32")
    assert run(*argv) == 0
    md = (tmp_path / "sweep.md").read_text()
    assert "| default | " in md and "| base_lr=1.0,clip=none | " in md
    assert len(json.loads((tmp_path / "sweep.json").read_text())["results"]) == 2


@pytest.mark.parametrize("extra,match", [
    (["--grid", "256x16"], "SEQ_LEN:PAIRS"),
    (["--grid", "64:16"], "too short"),
    (["--mixers", "transformer"], "unknown mixers"),
    (["--set", "base_lr=-1"], "base_lr"),
    (["--set", "no_such_field=1"], "no_such_field"),
    (["--set", "base_lr"], "key=value"),
])
def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, extra, match):
    code = run("eval", "mqar", "--out", str(tmp_path), "--quiet", "--steps", "1", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert not (tmp_path / "mqar.json").exists()


def test_capacity_probe_separates_the_skip_free_memory_from_the_spec_one():
    """benchmarks/mqar_capacity.py: with the spec's skip (f = z + W2 h) an untrained head's
    reads sit at chance among the written values; without it (read_residual=False) they retrieve."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "mqar_capacity.py"
    spec = importlib.util.spec_from_file_location("mqar_capacity", path)
    capacity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capacity)
    small = dict(pairs=8, filler=16, d=32, chunk=16, memories=8)
    with_skip = capacity.probe(residual=True, **small)
    skip_free = capacity.probe(residual=False, **small)
    assert with_skip["write_share"] < 0.05 and with_skip["top1"] < 0.3
    assert skip_free["top1"] > 0.8 and skip_free["write_share"] > 0.3


def test_mixture_cycles_through_the_halvings_that_fit_the_window():
    cfg = ProbeConfig(window=64)
    assert training_points(512, 32, cfg) == [(512, 32)]
    mixed = dataclasses.replace(cfg, mixture=True)
    # 64:4 would need 64 >= 8 + 64 + 7 tokens: it stops at 128:8
    assert training_points(512, 32, mixed) == [(512, 32), (256, 16), (128, 8)]
    assert training_points(256, 15, mixed) == [(256, 15)]  # 15 pairs do not halve
    for length, pairs in training_points(1024, 64, mixed):  # every point is a valid layout
        multiquery_ar(1, length, pairs, vocab_size=VOCAB, min_gap=cfg.window)
    assert with_settings(cfg, {"mixture": True}).mixture is True


def test_a_mixture_run_trains_on_every_point_and_evaluates_on_the_target(monkeypatch):
    seen = []
    real = mqar.multiquery_ar

    def spy(n, seq_len, pairs, **kw):
        seen.append((n, seq_len, pairs))
        return real(n, seq_len, pairs, **kw)

    monkeypatch.setattr(mqar, "multiquery_ar", spy)
    cfg = ProbeConfig(**{**TINY, "steps": 4, "eval_every": 100, "budget_s": 3600}, mixture=True)
    record = mqar.train_point("allmem", 64, 8, cfg, progress=False)
    assert record["steps"] == 4 and "mixture" in record["settings"]
    train = [(length, pairs) for n, length, pairs in seen if n == cfg.batch]
    assert train == [(64, 8), (32, 4), (64, 8), (32, 4)]
    assert (cfg.eval_examples, 64, 8) in seen  # held-out stays at the target point
