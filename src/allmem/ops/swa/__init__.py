"""Sliding-window attention with sink tokens: blocked prefill and dense decode."""

from .blocked import swa_blocked
from .naive import swa_dense

__all__ = ["swa_blocked", "swa_dense"]
