"""Training checkpoints without pickle: trainable parameters, optimizer state, scheduler,
RNG and data position in safetensors + JSON, written atomically (temp dir + rename)."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..files import normal_permissions

LATEST = "latest"


class CheckpointMismatchError(ValueError):
    """A checkpoint's trainable tensors do not fit the model being resumed (the recipe's memory
    changed shape since it was written)."""


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
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
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
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is incomplete; remove {pointer} to start over")
    return path


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict[str, Any]:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "trainable.safetensors"))
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
    _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    random.setstate((3, tuple(meta["python_random"]), None))
    return meta
