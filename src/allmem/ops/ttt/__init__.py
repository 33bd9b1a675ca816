"""The memory op: residual SwiGLU fast weights trained chunk by chunk at test time."""

from .chunk import chunk_ttt, set_compiled, ttt_update
from .fast_weights import FastWeights, TTTState, row_norms, swiglu_loss_grads, swiglu_read

__all__ = ["FastWeights", "TTTState", "chunk_ttt", "row_norms", "set_compiled", "swiglu_loss_grads", "swiglu_read", "ttt_update"]
