"""The SSD op of Mamba-2 (Dao & Gu 2024): a scalar-decay linear recurrence per head,

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t

as a chunked scan (prefill), one recurrent step (decode) and a token loop (reference)."""

from .chunk import chunk_ssd
from .naive import naive_ssd
from .recurrent import ssd_step

__all__ = ["chunk_ssd", "naive_ssd", "ssd_step"]
