"""One recurrent step of the SSD scan (decode: one token per row)."""

from __future__ import annotations

import torch


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_ssd`` for a single token (the time axis dropped).

    Args:
        x: [b, H, P]; dt: [b, H]; A: [H]; B, C: [b, N]; initial_state: [b, H, P, N].

    Returns:
        y: [b, H, P] (without D), final_state: [b, H, P, N].
    """
    decay = torch.exp(dt * A)[..., None, None]
    state = initial_state * decay + (x * dt[..., None])[..., None] * B[:, None, None, :]
    return (state @ C[:, None, :, None]).squeeze(-1), state
