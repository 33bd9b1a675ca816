"""AllMemCache: the constant-size decoding state of a converted model (spec 1.6).

Per layer: S sink keys/values, a ring buffer of W keys/values, the fast weights and their
momentum, the partial chunk and the conv inputs (``LayerState``). Plus, per row, how many
real tokens it has consumed. Nothing here grows with the number of tokens seen.

It is a plain object, not a ``transformers.Cache``: ``generate()`` only asks it for
``get_seq_length``, ``is_linear`` and ``is_compileable``, and the inherited defaults of
``Cache`` would be silently wrong for a recurrent state.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .baselines.mamba2 import Mamba2State
from .layer import LayerState, WindowState
from .memory import MemoryState

CACHE_FORMAT = "allmem-cache/1"
MEMORY_STATES = {"ttt": MemoryState, "mamba2": Mamba2State}  # memory_type -> state class


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "AllMemCache":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved AllMem state at {path}; save one with AllMemCache.save or `allmem read`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} is not an AllMem cache file (format {meta.get('format')!r}, expected {CACHE_FORMAT!r})")
        memory_type = meta.get("memory_type", "ttt")  # files from before memory_type hold TTT states
        if memory_type not in MEMORY_STATES:
            raise ValueError(f"{path} holds memory states of unknown type {memory_type!r}; known: {sorted(MEMORY_STATES)}")
        state_cls = MEMORY_STATES[memory_type]
        tensors = load_file(str(path), device=str(device))
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
        return cache
