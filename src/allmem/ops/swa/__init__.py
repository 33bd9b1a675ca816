"""Sliding-window attention with sink tokens: blocked prefill (CPU), FlexAttention prefill
(CUDA) and dense decode, with the dense form as the reference for tests."""

import os

from .blocked import swa_blocked
from .flex import flex_available, swa_flex
from .naive import swa_dense

BACKENDS = ("auto", "blocked", "flex")


def prefill_backend(is_cuda: bool) -> str:
    """``ALLMEM_SWA_BACKEND``: ``auto`` (default: flex on CUDA, blocked elsewhere), ``blocked`` or ``flex``."""
    choice = os.environ.get("ALLMEM_SWA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"ALLMEM_SWA_BACKEND={choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "flex" if is_cuda and flex_available() else "blocked"
    return choice


def swa_prefill(q, k, v, key_pos, query_pos, *, window, scale, block=None, **sinks):
    """Prefill attention by the backend ``prefill_backend`` picks (same contract as both)."""
    if prefill_backend(q.is_cuda) == "flex":
        return swa_flex(q, k, v, key_pos, query_pos, window=window, scale=scale, **sinks)
    return swa_blocked(q, k, v, key_pos, query_pos, window=window, scale=scale, block=block, **sinks)


__all__ = ["BACKENDS", "prefill_backend", "swa_blocked", "swa_dense", "swa_flex", "swa_prefill"]
