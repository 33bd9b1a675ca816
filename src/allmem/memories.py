"""The memory of an AllMem layer, as the layer and the cache see it: one small interface
(``Memory`` and its ``RecurrentState``) and a factory that picks the module by
``AllMemConfig.memory_type``.

``"ttt"`` is the AllMem memory (``allmem.memory``); ``"mamba2"`` the paper's baseline
(``allmem.baselines.mamba2``), imported only when asked for, so the core (layer, cache,
model) does not depend on the baselines.
"""

from __future__ import annotations

from typing import Callable, Protocol, Self, runtime_checkable

import torch
from torch import nn

from .config import MEMORY_TYPES, AllMemConfig
from .memory import AllMemMemory, MemoryState


@runtime_checkable
class RecurrentState(Protocol):
    """A memory's constant-size state for a batch of rows: what the cache reorders, saves
    and restores. Every tensor has the batch as its first dimension."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by a stable name (the names a saved cache uses)."""
        ...

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Self:
        """The inverse of ``tensors``."""
        ...

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Self:
        """``fn`` applied to every tensor (batch reordering), the structure kept."""
        ...


@runtime_checkable
class Memory(Protocol):
    """The memory module of one layer (an ``nn.Module``; its ``forward`` is this call).

    Rows are aligned: each row's ``seq_lens[b]`` real tokens come first, padding after, and
    padding never changes the state. ``state`` None starts from the module's initial state;
    with ``keep_state`` False the returned state is None (training, one-shot prefill)."""

    def __call__(
        self,
        x: torch.Tensor,
        seq_lens: torch.Tensor,
        state: RecurrentState | None,
        config: AllMemConfig,
        keep_state: bool,
    ) -> tuple[torch.Tensor, RecurrentState | None]:
        """x [B, T, d], seq_lens [B] -> (output [B, T, d], the state after the real tokens)."""
        ...

    def empty_state(self, batch: int, chunk: int, device=None, dtype=None) -> RecurrentState:
        """A fresh state for ``batch`` rows; ``dtype`` is the activation dtype."""
        ...


def build_memory(hidden_size: int, heads: int, head_dim: int, config: AllMemConfig) -> nn.Module:
    """The memory module of a layer whose attention has ``heads`` key/value heads of
    ``head_dim``, for ``config.memory_type``.

    ttt: ``config.memory_heads`` x ``config.memory_head_dim`` heads, each defaulting to the
    attention's. mamba2: sized by ``Mamba2Memory.for_config`` (the TTT memory's parameter
    count unless its dimensions are given)."""
    if config.memory_type == "ttt":
        return AllMemMemory(hidden_size, config.memory_heads or heads, config.memory_head_dim or head_dim, config)
    if config.memory_type == "mamba2":
        from .baselines.mamba2 import Mamba2Memory  # here, not at the top: the core does not need it

        return Mamba2Memory.for_config(hidden_size, heads, head_dim, config)
    raise ValueError(f"unknown memory_type {config.memory_type!r}; choose one of {MEMORY_TYPES}")


def memory_state_class(memory_type: str) -> type[RecurrentState]:
    """The state class of a ``memory_type`` (what a saved cache is rebuilt with)."""
    if memory_type == "ttt":
        return MemoryState
    if memory_type == "mamba2":
        from .baselines.mamba2 import Mamba2State

        return Mamba2State
    raise ValueError(f"unknown memory_type {memory_type!r}; choose one of {MEMORY_TYPES}")


def memory_type_of(state: object) -> str | None:
    """The ``memory_type`` whose state class ``state`` is an instance of, else None."""
    for name in MEMORY_TYPES:
        if isinstance(state, memory_state_class(name)):
            return name
    return None
