"""A save killed half-way loses nothing and leaves nothing behind: the next save removes the
killed writer's temp files (never a live writer's), and ``--resume`` skips a damaged newest
checkpoint for the one before it, saying so."""

import json
import logging
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import allmem
from allmem import cli
from allmem.distill.checkpoint import CheckpointDamagedError, load_checkpoint, resume_checkpoint, save_checkpoint
from allmem.distill.trainer import DistillTrainer
from allmem.modeling import ADAPTER_WEIGHTS
from test_clear_errors import one_step_distill_args
from test_distill import tiny_recipe

KILLED_MID_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import allmem, allmem.cache, allmem.distill.checkpoint, allmem.modeling

    kind, out, adapter = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    module = {"checkpoint": allmem.distill.checkpoint, "accelerated checkpoint": allmem.distill.checkpoint,
              "state": allmem.cache, "adapter": allmem.modeling}[kind]
    write = module.save_file
    def write_then_hang(tensors, path, *args, **kwargs):
        write(tensors, path, *args, **kwargs)
        print("half-written", flush=True)
        time.sleep(600)

    module.save_file = write_then_hang
    if kind.endswith("checkpoint"):
        from accelerate import Accelerator

        params = {"w": torch.nn.Parameter(torch.ones(4096))}
        optimizer = torch.optim.AdamW(params.values())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        accelerator = Accelerator() if kind == "accelerated checkpoint" else None
        if accelerator is not None:
            optimizer = accelerator.prepare(optimizer)
        module.save_checkpoint(out, 1, params, optimizer, scheduler, {}, accelerator)
    else:
        model = allmem.from_pretrained(adapter)
        if kind == "state":
            cache = model.new_cache()
            model(torch.ones(1, 8, dtype=torch.long), cache=cache)
            cache.save(out / "state.safetensors")
        else:
            model.save_pretrained(out / "adapter")
""")



def _hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _tiny_training_state(accelerated=False):
    """Parameters, optimizer, scheduler and (accelerated) the Accelerator that prepared the optimizer."""
    from accelerate import Accelerator

    params = {"w": torch.nn.Parameter(torch.ones(3))}
    optimizer = torch.optim.AdamW(params.values())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator() if accelerated else None
    if accelerated:
        optimizer = accelerator.prepare(optimizer)
    return params, optimizer, scheduler, accelerator


def _save_again(kind, tmp_path, adapter):
    if kind.endswith("checkpoint"):
        params, optimizer, scheduler, accelerator = _tiny_training_state(kind == "accelerated checkpoint")
        save_checkpoint(tmp_path, 2, params, optimizer, scheduler, {}, accelerator)
        return tmp_path / "step-000002" / "state.json"
    model = allmem.from_pretrained(adapter)
    if kind == "state":
        cache = model.new_cache()
        model(torch.ones(1, 8, dtype=torch.long), cache=cache)
        cache.save(tmp_path / "state.safetensors")
        return tmp_path / "state.safetensors"
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter" / ADAPTER_WEIGHTS


@pytest.mark.parametrize("kind,name", [("checkpoint", "checkpoint"), ("accelerated checkpoint", "checkpoint"),
                                       ("state", "state.safetensors"), ("adapter", "adapter")])
def test_the_next_save_removes_what_a_killed_save_left_but_not_a_live_save(kind, name, tmp_path, tiny_adapter):
    writer = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, kind, str(tmp_path), str(tiny_adapter)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "half-written"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert len(_hidden(tmp_path)) == 1, "the killed save should have left its temp file or folder"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        in_progress = tmp_path / f".{name}.{live.pid}.abc"  # another process, still saving
        in_progress.mkdir()
        assert _save_again(kind, tmp_path, tiny_adapter).is_file()
        assert _hidden(tmp_path) == [in_progress.name]
    finally:
        live.kill()
        live.wait()


def test_resume_skips_a_truncated_newest_checkpoint_and_continues_exactly(tiny_smollm_dir, tmp_path, caplog):
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path, steps=4)
    first = DistillTrainer(recipe, progress=False).setup()
    losses = [r.loss for r in first.train()]  # checkpoints at steps 2 and 4
    newest = tmp_path / "checkpoints" / "step-000004" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="allmem.distill.checkpoint"):
        resumed = DistillTrainer(recipe, resume=True, progress=False).setup()
    assert resumed.step == 2
    assert "step-000004" in caplog.text and "cannot be read" in caplog.text and "before it" in caplog.text
    again = [r.loss for r in resumed.train()]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(losses[2:4]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accelerated", [False, True], ids=["format 1", "save_state"])
@pytest.mark.parametrize("damage", ["truncate", "nan", "empty state", "missing file", "truncate optimizer",
                                    "nan optimizer"])
def test_resume_with_every_checkpoint_damaged_is_refused(tmp_path, damage, accelerated):
    params, optimizer, scheduler, accelerator = _tiny_training_state(accelerated)
    params["w"].grad = torch.ones(3)
    optimizer.step()  # the optimizer holds state to damage
    path = save_checkpoint(tmp_path, 1, params, optimizer, scheduler, {}, accelerator)
    target = path / "trainable.safetensors"
    optimizer_file = path / ("optimizer.bin" if accelerated else "optimizer.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    elif damage == "nan":
        from safetensors.torch import save_file
        save_file({"w": torch.tensor([1.0, float("nan"), 1.0])}, str(target))
    elif damage == "empty state":
        (path / "state.json").write_text("")
    elif damage == "missing file":
        (path / ("random_states_0.pkl" if accelerated else "rng.safetensors")).unlink()
    elif damage == "truncate optimizer":
        optimizer_file.write_bytes(optimizer_file.read_bytes()[:-10])
    else:  # a NaN in Adam's moments, written the way each format writes them
        state = optimizer.state_dict()
        state["state"][0]["exp_avg"][1] = float("nan")
        if accelerated:
            torch.save(state, optimizer_file)
            meta = json.loads((path / "state.json").read_text())
            meta["files"]["optimizer.bin"] = optimizer_file.stat().st_size  # at full size: only the NaN is wrong
            (path / "state.json").write_text(json.dumps(meta))
        else:
            from safetensors.torch import save_file
            save_file({"state.0.exp_avg": state["state"][0]["exp_avg"],
                       "state.0.exp_avg_sq": state["state"][0]["exp_avg_sq"]}, str(optimizer_file))
    before = params["w"].detach().clone()
    with pytest.raises(CheckpointDamagedError, match="step-000001.*start over without --resume"):
        resume_checkpoint(tmp_path, params, optimizer, scheduler, accelerator)
    assert torch.equal(params["w"], before)


def test_a_save_state_checkpoint_needs_the_accelerator(tmp_path):
    params, optimizer, scheduler, accelerator = _tiny_training_state(accelerated=True)
    path = save_checkpoint(tmp_path, 1, params, optimizer, scheduler, {}, accelerator)
    with pytest.raises(ValueError, match="written by accelerate's save_state: load it with the Accelerator"):
        load_checkpoint(path, params, optimizer, scheduler)


def test_cli_resume_of_a_damaged_run_is_one_error_line(tiny_smollm_dir, tmp_path, capsys):
    common = one_step_distill_args(tiny_smollm_dir, tmp_path / "run")
    assert cli.main(["distill", "--recipe", "smollm2-cpu", "--quiet", *common]) == 0
    capsys.readouterr()
    (tmp_path / "run" / "checkpoints" / "step-000001" / "optimizer.bin").write_bytes(b"")
    assert cli.main(["distill", "--recipe", "smollm2-cpu", "--quiet", "--resume", *common, "train.steps=2"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "step-000001" in lines[0] and "start over" in lines[0], err
    assert "Traceback" not in err
