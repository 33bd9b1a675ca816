"""Training checkpoints without pickle: trainable parameters, optimizer state, scheduler,
RNG and data position in safetensors + JSON, written atomically (temp dir + rename).

Every checkpoint is kept (``step-XXXXXX``), so a resume that finds the newest one damaged
(a disk filled up, a copy cut short) falls back to the one before it and says so."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_temp_dir, normal_permissions

LATEST = "latest"
TEMP_NAME = "checkpoint"  # temp dirs of unfinished saves: .checkpoint.<pid>.*
FILES = ("state.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint's trainable tensors do not fit the model being resumed (the recipe's memory
    changed shape since it was written)."""


class CheckpointDamagedError(ValueError):
    """No checkpoint under a run's folder can be read back (truncated, emptied, NaN)."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        per_param.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, step: int, params: dict[str, torch.Tensor], optimizer, scheduler,
                    extra: dict[str, Any]) -> Path:
    """Write ``directory/step-XXXXXX`` atomically and point ``directory/latest`` at it."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = atomic_temp_dir(directory, TEMP_NAME)
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        save_file(rng, tmp / "rng.safetensors")
        meta = {
            "step": step,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "python_random": random.getstate()[1],
            **extra,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_jsonable) + "\n")
        normal_permissions(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, directory / LATEST)
    return final


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the highest step (a kill between the rename and the
    pointer update), else None."""
    candidates = _newest_first(directory)
    return candidates[0] if candidates else None


def _newest_first(directory: Path) -> list[Path]:
    steps = sorted((p for p in directory.glob("step-*") if p.is_dir()), reverse=True)
    pointer = directory / LATEST
    named = directory / pointer.read_text().strip() if pointer.is_file() else None
    if named is None or named not in steps:
        return steps
    return [named] + [p for p in steps if p.name < named.name]  # nothing newer than the pointer


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Everything a checkpoint holds, read and checked before anything is applied."""
    from safetensors import SafetensorError

    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointDamagedError(f"{path} is incomplete ({', '.join(missing)} missing)")
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "trainable.safetensors"))
        optimizer = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))["torch"]
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointDamagedError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    absent = [k for k in ("step", "optimizer", "scheduler", "python_random") if not isinstance(meta, dict) or k not in meta]
    if absent:
        raise CheckpointDamagedError(f"{path}/state.json lacks {', '.join(absent)}")
    for group, kind in ((tensors, "trainable"), (optimizer, "optimizer")):
        bad = next((k for k, t in group.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise CheckpointDamagedError(f"{path} holds NaN/Inf in {kind} tensor {bad}")
    return meta, tensors, optimizer, rng


def resume_checkpoint(directory: Path, params: dict[str, torch.nn.Parameter], optimizer,
                      scheduler) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest readable checkpoint under ``directory`` (None if there is none); a damaged
    one is skipped with a warning naming it. Raises ``CheckpointDamagedError`` when checkpoints
    exist but none can be read, ``CheckpointMismatchError`` when the newest readable one does
    not fit the model."""
    candidates = _newest_first(directory)
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, params, optimizer, scheduler)
        except CheckpointDamagedError as exc:
            problems.append(str(exc))
            log.warning("%s; resuming from the checkpoint before it instead", exc)
    if problems:
        raise CheckpointDamagedError(f"no checkpoint under {directory} can be resumed: {'; '.join(problems)}; "
                                     "start over without --resume (or in a new train.output_dir)")
    return None


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict[str, Any]:
    meta, tensors, optimizer_tensors, rng = _read(path)
    # every name and shape is checked before any parameter is touched
    fix = ("resume with the recipe that wrote it, or start a new run in another train.output_dir "
           "(or move the checkpoints away)")
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointMismatchError(f"{path} does not match this model: missing {missing[:3]}, unexpected "
                                      f"{unexpected[:3]}; {fix}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointMismatchError(
                f"{path} does not match this model: {name} has shape {tuple(tensors[name].shape)} in the "
                f"checkpoint but {tuple(p.shape)} in the model (the memory changed shape); {fix}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))
    _restore_optimizer(optimizer, optimizer_tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng)
    random.setstate((3, tuple(meta["python_random"]), None))
    return meta
