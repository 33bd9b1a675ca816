"""The chunked SSD scan (Mamba-2's prefill): the fast path.

Inside a chunk the recurrence is the decay-masked "attention" form (``segsum``); between
chunks a loop passes the state on. Only that loop is sequential. Padded steps (dt = 0) have
no decay and no input, so they leave the state untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L] with out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above.

    Built from masked cumulative sums (not differences of one cumsum), so exp() of it is
    exactly 1 on the diagonal and stable for long chunks."""
    length = a.shape[-1]
    a = a[..., None].expand(*a.shape, length)  # [..., i, j] = a[i]
    strict = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    out = a.masked_fill(~strict, 0).cumsum(dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~lower, -math.inf)


def chunk_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan over a whole sequence, chunk by chunk (without Mamba-2's D skip).

    Args:
        x: [b, T, H, P] inputs.
        dt: [b, T, H] step sizes (>= 0; 0 = the token is skipped).
        A: [H] decay rates (< 0).
        B, C: [b, T, N] input and output projections, shared by the heads (one group).
        initial_state: [b, H, P, N], or None for zeros.
        chunk_size: tokens per chunk (any T is accepted: the last chunk is padded).

    Returns:
        y: [b, T, H, P], final_state: [b, H, P, N]. Everything is computed in the dtype of
        ``x`` (cast before calling).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, heads, head_dim = x.shape
    state_size = B.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, head_dim, state_size)
    if length == 0:
        return x, initial_state
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    if pad:  # padded steps have dt = 0: no decay and no input, so they change nothing
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    x = x.view(batch, num_chunks, chunk_size, heads, head_dim)
    dt = dt.view(batch, num_chunks, chunk_size, heads)
    B = B.view(batch, num_chunks, chunk_size, state_size)
    C = C.view(batch, num_chunks, chunk_size, state_size)

    a = (dt * A).permute(0, 3, 1, 2)  # [b, H, nc, l]: log decay of every step
    a_cum = a.cumsum(-1)
    xdt = (x * dt[..., None]).permute(0, 3, 1, 2, 4)  # [b, H, nc, l, P]

    # inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    scores = C @ B.transpose(-1, -2)  # [b, nc, l, l], shared by the heads (one group)
    y = (scores[:, None] * torch.exp(segsum(a))) @ xdt  # [b, H, nc, l, P]

    # what each chunk alone adds to the state at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, H, nc, l]
    chunk_states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B[:, None]  # [b, H, nc, P, N]
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, H, nc]

    # between chunks (the only sequential part): the state entering every chunk
    state = initial_state
    entering = []
    for c in range(num_chunks):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, :, c]
    entering = torch.stack(entering, dim=2)  # [b, H, nc, P, N]

    # the entering state read by every step of the chunk, decayed up to that step
    y = y + (C[:, None] @ entering.transpose(-1, -2)) * torch.exp(a_cum)[..., None]
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk_size, heads, head_dim)
    return y[:, :length], state
