"""Feeding inputs of any length through a converted model with constant memory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil
import torch
from tqdm.auto import tqdm

from .cache import AllMemCache
from .modeling import AllMemForCausalLM


def resident_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


@torch.no_grad()
def ingest(
    model: AllMemForCausalLM,
    input_ids: torch.Tensor,
    cache: AllMemCache | None = None,
    *,
    segment: int = 1024,
    progress: bool = True,
    on_segment: Callable[[int, AllMemCache], None] | None = None,
) -> AllMemCache:
    """Run ``input_ids`` [B, L] through the model ``segment`` tokens at a time into ``cache``.

    Work and memory per segment are O(segment x (W + S)) whatever L is; only the logits of
    the last position are computed. The progress bar shows tokens/s, cache bytes and the
    process's resident memory, which stay flat.
    """
    if segment <= 0:
        raise ValueError(f"segment must be a positive number of tokens, got {segment}")
    cache = cache if cache is not None else model.new_cache()
    total = input_ids.shape[1]
    bar = tqdm(total=total, unit="tok", desc="ingest", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for begin in range(0, total, segment):
        piece = input_ids[:, begin : begin + segment]
        model(piece, cache=cache, logits_to_keep=1)
        bar.update(piece.shape[1])
        bar.set_postfix(
            cache=f"{cache.nbytes() / 2**20:.1f}MiB", rss=f"{resident_mib():.0f}MiB",
            tok_s=f"{(begin + piece.shape[1]) / (time.perf_counter() - start):.0f}",
        )
        if on_segment is not None:
            on_segment(begin + piece.shape[1], cache)
    bar.close()
    return cache
