"""Distillation refuses broken input and broken runs: wrong recipe types, data that trains
nothing, and a diverging run (non-finite steps are skipped, never saved, and stop the run)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from allmem.config import ConfigError
from allmem.distill.data import DataError, file_samples
from allmem.distill.recipe import builtin_recipes, load_recipe
from allmem.distill.trainer import DistillTrainer, TrainingDiverged
from test_distill import tiny_recipe


@pytest.mark.parametrize("override,message", [
    ("train.steps=2.5", "train.steps must be int"),
    ("train.steps=true", "train.steps must be int"),
    ("train.lr=abc", "train.lr must be float"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.betas=[0.9]", "train.betas must be two numbers"),
    ("train.kl_chunk=0", "train.kl_chunk must be > 0"),
    ("train.decay_fraction=2", "decay_fraction"),
    ("train.init_adapter=3", "train.init_adapter must be str or None"),
    ("dtype=float64", "dtype must be one of float32, bfloat16, float16"),
    ("train.save_total_limit=1", "save_total_limit must be 0"),
])
def test_recipe_overrides_with_wrong_types_or_ranges_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("smollm2-cpu", [override])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_recipe("smollm2-cpu", [f"train.output_dir={tmp_path / 'file'}"])


@pytest.fixture(scope="module")
def tokenizer():
    import allmem

    return allmem.load_base("smollm2")[1]


@pytest.mark.parametrize("content,message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r":1: no assistant turn"),
    ('{"text": "ok"}\n{"messages": [{"role": "narrator", "content": "hi"}]}\n', r":2: messages\[0\].role = 'narrator'"),
    ("", "no records"),
    ("\n\n", "no records"),
])
def test_data_that_trains_nothing_is_refused_naming_the_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        file_samples(tokenizer, path, 256)


def test_invalid_utf8_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid UTF-8"):
        file_samples(tokenizer, path, 256)


def test_non_finite_steps_are_skipped_never_saved_and_stop_the_run(tiny_smollm_dir, tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path, steps=12, **{"train.save_every": 1, "train.max_bad_steps": 3})
    trainer = DistillTrainer(recipe, progress=False).setup()
    real_loss_on = trainer.loss_on
    calls = {"n": 0}

    def loss_on(samples, model=None):
        calls["n"] += 1
        loss, res = real_loss_on(samples, model)
        if calls["n"] > 2:  # from step 3 on the loss is NaN, as in a diverged run
            loss = loss * float("nan")
            res.loss = float("nan")
        return loss, res

    monkeypatch.setattr(trainer, "loss_on", loss_on)
    after_two = None
    with pytest.raises(TrainingDiverged, match="non-finite for 3 steps in a row"):
        results = []
        for _ in range(12):
            results += trainer.train(stop_after=1)
            if trainer.step == 2:
                after_two = {n: p.detach().clone() for n, p in trainer.params.items()}
    assert trainer.step == 5
    for name, p in trainer.params.items():  # the skipped steps moved nothing
        assert torch.equal(p, after_two[name]), name
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, False, True, True, True]
    for path in (tmp_path / "checkpoints").glob("step-*"):
        tensors = load_file(str(path / "trainable.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), path
    assert not (tmp_path / "adapter").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_written(tiny_smollm_dir, tmp_path):
    trainer = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path, steps=2), progress=False).setup()
    with torch.no_grad():
        next(iter(trainer.params.values())).view(-1)[0] = math.inf
    with pytest.raises(TrainingDiverged, match="non-finite values"):
        trainer.save()
    assert not (tmp_path / "checkpoints").exists()


def test_cli_reports_a_diverged_run_as_one_error_line(tiny_smollm_dir, tmp_path, monkeypatch, capsys):
    from allmem import cli

    def nan_loss(self, samples, model=None):
        zero = sum(p.sum() for p in self.params.values()) * 0.0
        from allmem.distill.trainer import StepResult

        return zero * float("nan"), StepResult(float("nan"), float("nan"), float("nan"), 1)

    monkeypatch.setattr(DistillTrainer, "loss_on", nan_loss)
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path, steps=10)
    path = tmp_path / "r.yaml"
    import yaml

    data = recipe.to_dict()
    data["train"]["betas"] = list(data["train"]["betas"])
    path.write_text(yaml.safe_dump(data))
    rc = cli.main(["distill", "--recipe", str(path), "--quiet"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: the loss or gradient was non-finite for 5 steps"), err[-500:]
    assert "Traceback" not in err


def test_save_total_limit_keeps_only_the_newest_checkpoints_and_the_run_resumes(tiny_smollm_dir, tmp_path):
    trainer = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path, steps=6, **{"train.save_total_limit": 2}),
                             progress=False).setup()
    trainer.train(stop_after=5)
    runs = tmp_path / "checkpoints"
    assert sorted(p.name for p in runs.glob("step-*")) == ["step-000002", "step-000004"]
    resumed = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path, steps=6, **{"train.save_total_limit": 2}),
                             resume=True, progress=False).setup()
    assert resumed.step == 4
    resumed.train()
    assert sorted(p.name for p in runs.glob("step-*")) == ["step-000004", "step-000006"]


def test_a_full_disk_stops_the_run_with_one_error_line_and_keeps_the_last_checkpoint(tiny_smollm_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """Regression: run v14 died at step 840 with a safetensors traceback when the disk filled up."""
    import yaml
    from safetensors import SafetensorError

    from allmem import cli
    from allmem.distill import checkpoint

    real_save, calls = checkpoint.save_file, []

    def save_until_the_disk_is_full(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_until_the_disk_is_full)
    data = tiny_recipe(tiny_smollm_dir, tmp_path, steps=6).to_dict()
    data["train"]["betas"] = list(data["train"]["betas"])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = cli.main(["distill", "--recipe", str(path), "--quiet"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err, err[-800:]
    assert last.startswith("error: could not write the checkpoint of step 4") and "No space left" in last, last
    assert "step-000002 is the newest checkpoint" in last and "--resume" in last, last
    runs = tmp_path / "checkpoints"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "step-000002"]  # no temp folder left behind
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    resumed = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path, steps=6), resume=True, progress=False).setup()
    assert resumed.step == 2


def test_loss_accepts_float32_hidden_states_with_a_bf16_head():
    """Regression: under accelerate's bf16 mixed precision the model returns float32 hidden
    states while a bf16 base keeps a bf16 LM head; the loss must project them in its dtype."""
    from allmem.distill.losses import chunked_distill_loss

    head = torch.nn.Linear(8, 11, bias=False).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    ids = torch.randint(0, 11, (1, 6), generator=g)
    out = chunked_distill_loss(student.requires_grad_(), teacher, head, ids, torch.ones_like(ids), lambda_ce=0.5)
    assert out.tokens == 5 and math.isfinite(float(out.loss.detach()))
    out.loss.backward()
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())


@pytest.mark.parametrize("name,text", [("bad.yaml", "train: [unclosed\n"), ("bad.toml", "train = = 1\n")])
def test_a_recipe_that_is_not_valid_yaml_or_toml_is_one_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{name}: not valid"):
        load_recipe(str(path))


def test_saved_files_keep_the_users_normal_permissions(tmp_path, tiny_smollm_dir):
    """Atomic saves go through tempfile (0600/0700); what lands must be what open/mkdir would
    make under the user's umask (0644/0755 with umask 022), for adapters, states and checkpoints."""
    import os

    import allmem
    from allmem.distill.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        model = allmem.convert(allmem.load_base(str(tiny_smollm_dir))[0], allmem.AllMemConfig(window=16, chunk=8))
        model.save_pretrained(tmp_path / "adapter")
        cache = model.new_cache()
        model(torch.randint(0, 100, (1, 20)), cache=cache)
        cache.save(tmp_path / "state.safetensors")
        params = model.memory_parameters()
        opt = torch.optim.AdamW(params.values())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step_dir = save_checkpoint(tmp_path / "ckpt", 1, params, opt, sched, {})
        from accelerate import Accelerator

        accelerator = Accelerator()  # accelerate's save_state writes the optimizer and RNG files
        saved_state = save_checkpoint(tmp_path / "ckpt2", 1, params, accelerator.prepare(opt), sched, {}, accelerator)
    finally:
        os.umask(old)
    files = [*(tmp_path / "adapter").iterdir(), tmp_path / "state.safetensors", *step_dir.iterdir(),
             *saved_state.iterdir()]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))
    assert step_dir.stat().st_mode & 0o777 == 0o755 and saved_state.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_built_in_recipe_loads_and_validates(name):
    recipe = load_recipe(name, [])
    recipe.allmem_config()  # the memory block is a valid AllMemConfig
    assert recipe.data and recipe.train.steps > 0
