"""Sliding-window attention with sink tokens: blocked prefill (CPU, any length), PyTorch's fused
CPU attention with a window mask (CPU inference at moderate lengths), FlexAttention prefill
(CUDA) and dense decode, with the dense form as the reference for tests."""

import os

import torch

from .blocked import swa_blocked
from .flex import flex_available, swa_flex
from .naive import swa_dense
from .sdpa import MAX_MASK_ELEMENTS, sdpa_available, swa_sdpa

BACKENDS = ("auto", "blocked", "flex", "sdpa")


def prefill_backend(is_cuda: bool, fused_ok: bool = False) -> str:
    """``ALLMEM_SWA_BACKEND``: ``auto`` (default: flex on CUDA; on CPU sdpa where ``fused_ok`` (no
    gradient, a small mask), else blocked), ``blocked``, ``flex`` or ``sdpa``."""
    choice = os.environ.get("ALLMEM_SWA_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"ALLMEM_SWA_BACKEND={choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        if is_cuda:
            return "flex" if flex_available() else "blocked"
        return "sdpa" if fused_ok and sdpa_available() else "blocked"
    return choice


def swa_prefill(q, k, v, key_pos, query_pos, *, window, scale, block=None, mask_cache=None, **sinks):
    """Prefill attention by the backend ``prefill_backend`` picks (same contract as all).
    ``mask_cache``: a dict shared by calls at mostly the same positions (sdpa builds each window mask once)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # the fused kernel takes the queries in blocks of W (at least 128), each against its band of keys:
    # at 1k tokens and W = 256 half the score work of one T x K call, a quarter at 2k after a full window
    band = max(window, 128)
    length, keys = q.shape[3], k.shape[2]
    fused_ok = not needs_grad and q.shape[0] * min(length, band) * min(keys, band + window) <= MAX_MASK_ELEMENTS
    backend = prefill_backend(q.is_cuda, fused_ok)
    if backend == "flex":
        return swa_flex(q, k, v, key_pos, query_pos, window=window, scale=scale, **sinks)
    if backend == "sdpa":
        return swa_sdpa(q, k, v, key_pos, query_pos, window=window, scale=scale, block=band, mask_cache=mask_cache,
                        **sinks)
    return swa_blocked(q, k, v, key_pos, query_pos, window=window, scale=scale, block=block, **sinks)


__all__ = ["BACKENDS", "prefill_backend", "swa_blocked", "swa_dense", "swa_flex", "swa_prefill", "swa_sdpa"]
