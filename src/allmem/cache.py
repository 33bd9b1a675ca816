"""AllMemCache: the constant-size decoding state of a converted model (spec 1.6).

Per layer: S sink keys/values, a ring buffer of W keys/values, the fast weights and their
momentum, the partial chunk and the conv inputs (``LayerState``). Plus, per row, how many
real tokens it has consumed. Nothing here grows with the number of tokens seen.

It is a plain object, not a ``transformers.Cache``: ``generate()`` only asks it for
``get_seq_length``, ``is_linear`` and ``is_compileable``, and the inherited defaults of
``Cache`` would be silently wrong for a recurrent state.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .baselines.mamba2 import Mamba2State
from .files import normal_permissions
from .layer import LayerState, WindowState
from .memory import MemoryState

CACHE_FORMAT = "allmem-cache/1"
MEMORY_STATES = {"ttt": MemoryState, "mamba2": Mamba2State}  # memory_type -> state class


class CacheFileError(ValueError):
    """A saved state cannot be resumed: unreadable (truncated, empty), not an AllMem state,
    altered since it was written (checksum mismatch) or holding NaN/Inf. The message is
    "{path} {problem}; {fix}"; the parts are kept so a caller (the CLI) can give its own fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = "save the state again"):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} {problem}; {fix}")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in key order: each key, dtype, shape and raw bytes. Stored in a
    saved state's metadata so that flipped data bytes (which safetensors cannot notice: its
    header only describes the layout) are caught on load."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key (in key order) of a floating-point tensor holding NaN or Inf, else None."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


class AllMemCache:
    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int, window: int, sinks: int, chunk: int):
        self.num_layers = num_layers
        self.window, self.sinks, self.chunk = window, sinks, chunk
        self.layers: list[LayerState | None] = [None] * num_layers
        self.seen: torch.Tensor | None = None  # [B] real tokens consumed per row
        self.columns = 0  # input columns consumed, padding included (what generate slices by)

    # ------------------------------------------------------- generate() API
    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        self.layers = [None] * self.num_layers
        self.seen, self.columns = None, 0

    # ------------------------------------------------------------- inspect
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.seen is not None:
            out["seen"] = self.seen
        for i, state in enumerate(self.layers):
            if state is None:
                continue
            out.update({f"layers.{i}.window.{k}": v for k, v in state.window.tensors().items()})
            out.update({f"layers.{i}.memory.{k}": v for k, v in state.memory.tensors().items()})
        return out

    def nbytes(self) -> int:
        """Bytes held by the cache; constant once every layer has been written once."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def batch_size(self) -> int:
        return 0 if self.seen is None else int(self.seen.shape[0])

    def _map(self, fn) -> None:
        if self.seen is not None:
            self.seen = fn(self.seen)
        for i, state in enumerate(self.layers):
            if state is not None:
                window = WindowState(**{k: fn(v) for k, v in state.window.tensors().items()})
                self.layers[i] = LayerState(window, state.memory.map(fn))

    def memory_type(self) -> str:
        """The memory_type whose states the layers hold ("ttt" while nothing is written)."""
        for state in self.layers:
            if state is not None:
                for name, cls in MEMORY_STATES.items():
                    if isinstance(state.memory, cls):
                        return name
        return "ttt"

    # ------------------------------------------------------- save / restore
    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write the state as one safetensors file, atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": CACHE_FORMAT,
            "num_layers": str(self.num_layers),
            "window": str(self.window),
            "sinks": str(self.sinks),
            "chunk": str(self.chunk),
            "columns": str(self.columns),
            "memory_type": self.memory_type(),
            "extra": json.dumps(metadata or {}),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta["sha256"] = tensors_sha256(tensors)  # checked by load
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            normal_permissions(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "AllMemCache":
        """Read a state written by ``save``. Refused (``CacheFileError``) when the file is not a
        readable AllMem state, when its tensors do not match the checksum stored at save time
        (files from before the checksum load without this check), or when any holds NaN/Inf:
        a damaged state would otherwise be resumed silently."""
        path = Path(path)
        if path.is_dir():
            raise CacheFileError(path, "is a directory, not a saved AllMem state", "give the state's file path")
        if not path.is_file():
            raise FileNotFoundError(f"no saved AllMem state at {path}; save one with AllMemCache.save or `allmem read`")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))  # on the CPU: the checks below run there
        except (SafetensorError, OSError) as exc:
            reason = "it is empty" if path.stat().st_size == 0 else (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CacheFileError(path, f"is not a readable safetensors file ({reason}): truncated or not an AllMem state") from exc
        if meta.get("format") != CACHE_FORMAT:
            raise CacheFileError(path, f"is not an AllMem cache file (format {meta.get('format')!r}, expected {CACHE_FORMAT!r})")
        memory_type = meta.get("memory_type", "ttt")  # files from before memory_type hold TTT states
        if memory_type not in MEMORY_STATES:
            raise CacheFileError(path, f"holds memory states of unknown type {memory_type!r} (known: {sorted(MEMORY_STATES)})",
                                 "load it with a version of allmem that knows that type")
        if "sha256" in meta and tensors_sha256(tensors) != meta["sha256"]:
            raise CacheFileError(path, "is damaged: its tensors do not match the SHA-256 stored when it was saved")
        bad = first_non_finite(tensors)
        if bad is not None:
            raise CacheFileError(path, f"holds NaN or Inf values (in {bad}): the state is damaged")
        state_cls = MEMORY_STATES[memory_type]
        tensors = {k: v.to(device) for k, v in tensors.items()}
        try:
            cache = cls(int(meta["num_layers"]), int(meta["window"]), int(meta["sinks"]), int(meta["chunk"]))
            cache.columns = int(meta["columns"])
            cache.seen = tensors.get("seen")
            for i in range(cache.num_layers):
                prefix = f"layers.{i}."
                if f"{prefix}window.sink_k" not in tensors:
                    continue
                window = WindowState(**{k[len(prefix) + 7:]: v for k, v in tensors.items() if k.startswith(prefix + "window.")})
                memory = state_cls.from_tensors({k[len(prefix) + 7:]: v for k, v in tensors.items() if k.startswith(prefix + "memory.")})
                cache.layers[i] = LayerState(window, memory)
            cache.metadata = json.loads(meta.get("extra", "{}"))
        except (KeyError, TypeError, ValueError) as exc:  # a field or tensor missing, a number unreadable
            raise CacheFileError(path, f"is an incomplete AllMem state ({type(exc).__name__}: {exc})") from exc
        return cache
