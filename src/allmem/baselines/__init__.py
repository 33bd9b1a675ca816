"""Baselines of the AllMem paper: the same SWA + sinks hybrid with another memory module.

``mamba2``: the memory replaced by a Mamba-2 (SSD) mixer of about the same parameter count
(select it with ``AllMemConfig(memory_type="mamba2")``; ``allmem.memories.build_memory``
imports it only then). Its scan is the op ``allmem.ops.ssd``.
"""

from .mamba2 import (
    Mamba2Dims,
    Mamba2Memory,
    Mamba2State,
    mamba2_dims_for_budget,
    mamba2_param_count,
    ttt_memory_param_count,
)

__all__ = [
    "Mamba2Dims",
    "Mamba2Memory",
    "Mamba2State",
    "mamba2_dims_for_budget",
    "mamba2_param_count",
    "ttt_memory_param_count",
]
