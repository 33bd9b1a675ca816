"""AllMemCache: the constant-size decoding state of a converted model (spec 1.6).

Per layer: S sink keys/values, a ring buffer of W keys/values, the fast weights and their
momentum, the partial chunk and the conv inputs (``LayerState``). Plus, per row, how many
real tokens it has consumed. Nothing here grows with the number of tokens seen.

It is a ``transformers.Cache``, so code written for Hugging Face caches (``isinstance``
checks, ``generate()``, beam search's ``reorder_cache``) accepts it. Its ``layers`` hold
AllMem's own ``LayerState`` (None until a layer is first written), read and written in place
by the layers through ``Segment``, not transformers' key/value layer classes: a recurrent
state has no key/value tensors to return, no mask to size and no past to crop. Every inherited
method that would be silently wrong for it is overridden here: it either answers correctly
(``get_seq_length``, ``is_linear``, ``is_sliding``, ``batch_size``, ``reorder_cache``,
``batch_select_indices``, ``batch_repeat_interleave``, ``reset``) or raises
``NotImplementedError`` saying why (``update``, the conv/recurrent/indexer hooks,
``get_mask_sizes``, ``early_initialization``, offloading, past recording). ``crop(0)`` is a
no-op; any other crop would need the dropped tokens back, so it marks the state as unusable
and the next forward or save refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Cache

from .config import MEMORY_TYPES
from .files import atomic_temp_file, normal_permissions
from .layer import LayerState, WindowState
from .memories import memory_state_class, memory_type_of

CACHE_FORMAT = "allmem-cache/1"


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


class AllMemCache(Cache):
    is_compileable = False  # plain attributes shadow Cache's properties: the answer is fixed
    is_croppable = False

    def __init__(self, num_layers: int, window: int, sinks: int, chunk: int):
        super().__init__(layers=[None] * num_layers)  # LayerState per layer, None until written
        self.num_layers = num_layers
        self.window, self.sinks, self.chunk = window, sinks, chunk
        self.layers: list[LayerState | None]
        self.seen: torch.Tensor | None = None  # [B] real tokens consumed per row
        self.columns = 0  # input columns consumed, padding included (what generate slices by)
        self.unusable: str | None = None  # why the state can no longer be continued (a crop)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_layers={self.num_layers}, window={self.window}, sinks={self.sinks}, "
                f"chunk={self.chunk}, batch_size={self.batch_size}, columns={self.columns})")

    # ------------------------------------------------------- generate() API
    @property
    def is_linear(self) -> list[bool]:
        # every layer holds window keys/values *and* a recurrent state (transformers answers
        # False for such mixed layers); not all True, so generate slices new inputs by
        # get_seq_length
        return [False] * self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return [True] * self.num_layers  # sinks + a sliding window in every layer

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_initialized(self) -> bool:
        return self.seen is not None

    @property
    def batch_size(self) -> int:
        """Rows held, or -1 before the first forward (as ``transformers.Cache``)."""
        return -1 if self.seen is None else int(self.seen.shape[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns consumed, padding included: what generate() slices new inputs by.
        The same for every layer. Rows' real-token counts are ``seen``."""
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum: the state does not grow with the tokens seen

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            return any(state is not None for state in self.layers)
        return layer_idx < self.num_layers and self.layers[layer_idx] is not None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows become ``beam_idx``'s rows (beam search); every tensor, ``seen`` included."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.layers = [None] * self.num_layers
        self.seen, self.columns, self.unusable = None, 0, None

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(0)`` does nothing. Any other crop would need the dropped tokens back (the
        memory has absorbed them and the ring buffer overwritten older ones): the state is
        then marked unusable, and the next forward or ``save`` raises."""
        if tokens_to_remove != 0:
            self.unusable = (f"crop({tokens_to_remove}) was asked of it: a recurrent state cannot drop tokens; "
                             "start a new cache (model.new_cache()) or reload a saved state")

    def check_usable(self) -> None:
        if self.unusable is not None:
            raise ValueError(f"this AllMemCache cannot be continued: {self.unusable}")

    # what transformers' key/value layers do and an AllMem state does not: raise, never guess
    def _unsupported(self, what: str, why: str):
        raise NotImplementedError(f"AllMemCache does not support {what}: {why}")

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._unsupported("update()", "AllMem layers write their own window and memory state in place "
                                      "(through Segment), not key/value tensors appended per call")

    def get_conv_state(self, *args, **kwargs):
        self._unsupported("the conv/recurrent state hooks", "the memory's conv inputs and fast weights live in each LayerState")

    update_conv_state = get_recurrent_state = update_recurrent_state = get_conv_state

    def update_indexer(self, *args, **kwargs):
        self._unsupported("update_indexer()", "it has no sparse-attention indexer")

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        self._unsupported("get_mask_sizes()", "an AllMem model builds no attention mask from the cache "
                                              "(sinks, the ring buffer and the memory are read directly)")

    def early_initialization(self, *args, **kwargs):
        self._unsupported("early_initialization()", "its states take their shapes from the first forward")

    def prefetch(self, *args, **kwargs):
        self._unsupported("offloading", "the state is constant-size; move the model and cache instead")

    offload = prefetch

    def activate_past_recording(self):
        self._unsupported("past recording", "a recurrent state keeps no past to roll back to (assisted "
                                            "and speculative decoding need it)")

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

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
                name = memory_type_of(state.memory)
                if name is not None:
                    return name
        return "ttt"

    # ------------------------------------------------------- save / restore
    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write the state as one safetensors file, atomically (temp file + rename)."""
        self.check_usable()
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
        tmp = atomic_temp_file(path.parent, path.name)
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
        if memory_type not in MEMORY_TYPES:
            raise CacheFileError(path, f"holds memory states of unknown type {memory_type!r} (known: {sorted(MEMORY_TYPES)})",
                                 "load it with a version of allmem that knows that type")
        if "sha256" in meta and tensors_sha256(tensors) != meta["sha256"]:
            raise CacheFileError(path, "is damaged: its tensors do not match the SHA-256 stored when it was saved")
        bad = first_non_finite(tensors)
        if bad is not None:
            raise CacheFileError(path, f"holds NaN or Inf values (in {bad}): the state is damaged")
        state_cls = memory_state_class(memory_type)
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
