"""Token-by-token reference of the SSD scan, for tests only.

The recurrence written out in float64, one step at a time: ``chunk_ssd`` and ``ssd_step``
must agree with it (values and gradients).
"""

from __future__ import annotations

import torch


def naive_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``chunk_ssd`` (arguments and shapes there; no ``chunk_size``),
    computed token by token in float64.

    Returns:
        y: [b, T, H, P] (without Mamba-2's D skip), final_state: [b, H, P, N], both float64.
    """
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, length, heads, head_dim = x.shape
    h = x.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None else initial_state.double()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # [b, H]
        h = decay[..., None, None] * h + torch.einsum("bh,bhp,bn->bhpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, heads, head_dim)
    return y, h
