"""Training checkpoints, written atomically (temp dir + rename) and kept per step (``step-XXXXXX``).

A checkpoint holds the trainable (memory) weights as ``trainable.safetensors`` (full tensors,
what an adapter holds), the step and LR-scheduler state in ``state.json``, and everything the
training engine owns through accelerate's ``Accelerator.save_state``: the optimizer (sharded
under DeepSpeed ZeRO and FSDP, one file per rank), the gradient scaler, and the RNG state of
every process (``random_states_<rank>.pkl``). The frozen base is not saved: it is rebuilt from
the base model. ``state.json`` also lists the size of every file, so a copy cut short is found
before anything is applied.

Every checkpoint is kept unless ``train.save_total_limit`` keeps only the newest few
(``prune_checkpoints``, at least two), so a resume that finds the newest one damaged (a disk filled
up, a copy cut short) falls back to the one before it and says so.

Format 1, written before accelerate's ``save_state`` was used (optimizer and the main process's
RNG in safetensors + JSON), still resumes. ``save_checkpoint`` without an accelerator (a plain
single-process optimizer) still writes it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_temp_dir, normal_permissions

if TYPE_CHECKING:
    from accelerate import Accelerator

LATEST = "latest"
TEMP_NAME = "checkpoint"  # temp dirs of unfinished saves: .checkpoint.<pid>.*
FORMAT = 2
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
FILES_V1 = (STATE, TRAINABLE, "optimizer.safetensors", "rng.safetensors")
log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint's trainable tensors do not fit the model being resumed (the recipe's memory
    changed shape since it was written)."""


class CheckpointDamagedError(ValueError):
    """No checkpoint under a run's folder can be read back (truncated, emptied, NaN)."""


# ------------------------------------------------------------------ saving
def save_checkpoint(directory: Path, step: int, params: dict[str, torch.Tensor], optimizer, scheduler,
                    extra: dict[str, Any], accelerator: Accelerator | None = None) -> Path:
    """Write ``directory/step-XXXXXX`` atomically and point ``directory/latest`` at it.

    With an accelerator this is a collective: every process must call it (each saves its RNG
    and, under ZeRO / FSDP, its optimizer shard). Without one it writes format 1 (one process)."""
    if accelerator is None:
        return _save_v1(directory, step, params, optimizer, scheduler, extra)
    from accelerate.utils import broadcast_object_list

    main = accelerator.is_main_process
    trainable = {n: _full_tensor(p) for n, p in params.items()}  # under FSDP a gather: every process
    accelerator.wait_for_everyone()
    tmp_name = [str(atomic_temp_dir(_mkdir(directory), TEMP_NAME)) if main else None]
    tmp = Path(broadcast_object_list(tmp_name)[0])  # the main process names it, everyone writes into it
    final = directory / f"step-{step:06d}"
    try:
        if main:
            save_file(trainable, tmp / TRAINABLE)
        handle = accelerator.register_save_state_pre_hook(_drop_model_weights)
        try:
            accelerator.save_state(str(tmp), safe_serialization=True, **_engine_kwargs(accelerator, saving=True))
        finally:
            handle.remove()
        accelerator.wait_for_everyone()  # every rank's files are in before the folder is published
        if main:
            meta = {"format": FORMAT, "step": step, "scheduler": scheduler.state_dict(),
                    "world_size": accelerator.num_processes, "files": _file_sizes(tmp), **extra}
            (tmp / STATE).write_text(json.dumps(meta, indent=1, default=_jsonable) + "\n")
            _publish(tmp, final)
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _drop_model_weights(models, weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate's save hook: no ``model.safetensors`` (the whole model, frozen base included);
    the trainable weights are in ``trainable.safetensors``."""
    weights.clear()


def _skip_model_weights(models: list[torch.nn.Module], input_dir: str) -> None:
    """accelerate's load hook: the trainable weights come from ``trainable.safetensors``."""
    models.clear()


def _engine_kwargs(accelerator: Accelerator, saving: bool) -> dict[str, Any]:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed saves its module itself: leave the frozen base out (and do not require it back)
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}
    return {}


def _engine_restores_weights(accelerator: Accelerator) -> bool:
    """Under DeepSpeed and FSDP the engine saves and loads the model (sharded) itself."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (FSDP2 shards parameters as DTensors; gathering is a collective)."""
    if hasattr(p, "full_tensor"):
        p = p.full_tensor()
    return p.detach().contiguous().cpu()


def _mkdir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder to ``final`` and point ``latest`` at it."""
    normal_permissions(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, final.parent / LATEST)


def _save_v1(directory: Path, step: int, params: dict[str, torch.Tensor], optimizer, scheduler,
             extra: dict[str, Any]) -> Path:
    """Format 1: optimizer state and the torch / Python RNG of this one process, without pickle."""
    final = directory / f"step-{step:06d}"
    tmp = atomic_temp_dir(_mkdir(directory), TEMP_NAME)
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, tmp / TRAINABLE)
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                "python_random": random.getstate()[1], **extra}
        (tmp / STATE).write_text(json.dumps(meta, indent=1, default=_jsonable) + "\n")
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer has {len(meta['param_groups'])} parameter groups but this trainer has "
            f"{len(optimizer.param_groups)} (an older allmem wrote it, before the eta heads got a group of their own, "
            "train.eta_lr_mult); resume it with that version, or warm-start from it: `allmem adapter` "
            "and train.init_adapter")
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints under ``directory`` (0: delete none); the one
    ``latest`` names is always kept. Returns what was deleted, oldest last."""
    if keep <= 0:
        return []
    removed = _newest_first(directory)[keep:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ------------------------------------------------------------------ finding
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


# ------------------------------------------------------------------ reading
def _damaged(path: Path, what: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"{path} {what}")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise _damaged(path, f"is incomplete ({STATE} missing)") from None
    except (OSError, ValueError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, f"cannot be read ({STATE} is not a mapping)")
    return meta


def _check_finite(path: Path, tensors: dict[str, torch.Tensor], kind: str) -> None:
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise _damaged(path, f"holds NaN/Inf in {kind} tensor {bad}")


def _read_v1(path: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Everything a format-1 checkpoint holds, read and checked before anything is applied."""
    from safetensors import SafetensorError

    missing = [name for name in FILES_V1 if not (path / name).is_file()]
    if missing:
        raise _damaged(path, f"is incomplete ({', '.join(missing)} missing)")
    absent = [k for k in ("step", "optimizer", "scheduler", "python_random") if k not in meta]
    if absent:
        raise _damaged(path, f"has a {STATE} that lacks {', '.join(absent)}")
    try:
        tensors = load_file(str(path / TRAINABLE))
        optimizer = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))["torch"]
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    _check_finite(path, tensors, "trainable")
    _check_finite(path, optimizer, "optimizer")
    return tensors, optimizer, rng


def _read_v2(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainable tensors of a format-2 checkpoint, after checking that every file it lists
    is there at its full size (a truncated optimizer or RNG file is found before anything is
    applied) and that the trainable and optimizer tensors are finite."""
    from safetensors import SafetensorError

    absent = [k for k in ("step", "scheduler", "files") if k not in meta]
    if absent:
        raise _damaged(path, f"has a {STATE} that lacks {', '.join(absent)}")
    for name, size in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise _damaged(path, f"is incomplete ({name} missing)")
        if file.stat().st_size != size:
            raise _damaged(path, f"cannot be read ({name} has {file.stat().st_size} bytes, {size} were written)")
    try:
        tensors = load_file(str(path / TRAINABLE))
        optimizer = path / "optimizer.bin"  # accelerate's name for a replicated (not sharded) optimizer
        state = torch.load(optimizer, map_location="cpu", weights_only=True)["state"] if optimizer.is_file() else {}
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    _check_finite(path, tensors, "trainable")
    _check_finite(path, {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)},
                  "optimizer")
    return tensors


def load_trained_weights(path: Path, params: dict[str, torch.nn.Parameter]) -> int:
    """Copy only the trained weights of checkpoint ``path`` (either format; checked complete, finite
    and fitting every name and shape first) into ``params``, e.g. to write an adapter from any step
    of a run. Returns the step it was written at."""
    meta = _read_meta(path)
    tensors = _read_v1(path, meta)[0] if meta.get("format", 1) == 1 else _read_v2(path, meta)
    _check_fit(path, params, tensors)
    _copy_into(params, tensors)
    return int(meta["step"])


def resume_checkpoint(directory: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                      accelerator: Accelerator | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest readable checkpoint under ``directory`` (None if there is none); a damaged
    one is skipped with a warning naming it. Raises ``CheckpointDamagedError`` when checkpoints
    exist but none can be read, ``CheckpointMismatchError`` when the newest readable one does
    not fit the model. With an accelerator every process must call it."""
    candidates = _newest_first(directory)
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, params, optimizer, scheduler, accelerator)
        except CheckpointDamagedError as exc:
            problems.append(str(exc))
            log.warning("%s; resuming from the checkpoint before it instead", exc)
    if problems:
        raise CheckpointDamagedError(f"no checkpoint under {directory} can be resumed: {'; '.join(problems)}; "
                                     "start over without --resume (or in a new train.output_dir)")
    return None


def _check_fit(path: Path, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Every name and shape, checked before any parameter is touched."""
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


def _copy_into(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Apply one checkpoint (either format) to the parameters, optimizer, scheduler and RNG."""
    meta = _read_meta(path)
    if meta.get("format", 1) == 1:
        tensors, optimizer_tensors, rng = _read_v1(path, meta)
        _check_fit(path, params, tensors)
        _copy_into(params, tensors)
        _restore_optimizer(optimizer, optimizer_tensors, meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(rng)  # format 1 kept the main process's RNG only: every process gets it
        random.setstate((3, tuple(meta["python_random"]), None))
        return meta
    if accelerator is None:
        raise ValueError(f"{path} was written by accelerate's save_state: load it with the Accelerator that "
                         "prepared the optimizer (load_checkpoint(..., accelerator=...), as DistillTrainer does)")
    tensors = _read_v2(path, meta)
    _check_fit(path, params, tensors)
    if meta.get("world_size", accelerator.num_processes) != accelerator.num_processes:
        log.warning("%s was written by %s processes and is resumed by %d: the data order and the RNG streams "
                    "differ from an uninterrupted run", path, meta.get("world_size"), accelerator.num_processes)
    if not _engine_restores_weights(accelerator):
        _copy_into(params, tensors)
    handle = accelerator.register_load_state_pre_hook(_skip_model_weights)
    try:
        accelerator.load_state(str(path), **_engine_kwargs(accelerator, saving=False))
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    finally:
        handle.remove()
    scheduler.load_state_dict(meta["scheduler"])
    return meta
