"""Token-by-token reference of the chunked memory, for tests only.

Independent of the fast path on purpose: its own SwiGLU forward, gradients by autograd
(``create_graph=True`` so outer-loop gradients can be compared too), a Python loop over
tokens that buffers keys until a chunk is full. Use float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fast_net(z: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    # z [N, d]; explicit einsums so no code is shared with the fast path
    hidden = F.silu(torch.einsum("nfd,nd->nf", w1, z)) * torch.einsum("nfd,nd->nf", w3, z)
    return z + torch.einsum("ndf,nf->nd", w2, hidden)


def naive_ttt(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    beta: torch.Tensor,
    initial_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    initial_momentum: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    reference_norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    chunk_size: int,
    loss: str = "mse",
    clip: float | None = 1.0,
    eps: float = 1e-5,
    update_mask: torch.Tensor | None = None,
):
    """Same contract as ``chunk_ttt``: q, k, v [N, L, d]; eta [N, L]; beta [N, num_chunks].

    Returns (o [N, L, d], weights, momentum) with weights/momentum as 3-tuples.
    """
    n, length, _ = q.shape
    weights = list(initial_weights)
    momentum = list(initial_momentum) if initial_momentum is not None else [torch.zeros_like(w) for w in weights]
    outputs = []
    pending: list[int] = []
    for t in range(length):
        outputs.append(_fast_net(q[:, t], *weights))
        pending.append(t)
        if len(pending) < chunk_size:
            continue
        chunk = t // chunk_size
        normalised = []
        for w, ref in zip(weights, reference_norms):
            row_norm = torch.sqrt((w * w).sum(dim=-1, keepdim=True))
            w_bar = w / (row_norm + eps) * ref
            # a constant state still needs a graph for autograd to differentiate the inner loss
            normalised.append(w_bar if w_bar.requires_grad else w_bar.detach().requires_grad_())
        total = 0.0
        for s in pending:
            pred = _fast_net(k[:, s], *normalised)
            if loss == "mse":
                per_token = 0.5 * ((pred - v[:, s]) ** 2).sum(-1)
            else:
                per_token = -(pred * v[:, s]).sum(-1)
            total = total + (eta[:, s] * per_token).sum()
        grads = torch.autograd.grad(total, normalised, create_graph=True)
        new_weights, new_momentum = [], []
        for w_bar, g, m in zip(normalised, grads, momentum):
            if clip is not None:
                norm = torch.sqrt((g * g).sum(dim=(1, 2)))
                factor = torch.minimum(torch.ones_like(norm), clip / norm.clamp_min(1e-12))
                g = g * factor[:, None, None]
            m_next = beta[:, chunk, None, None] * m + g
            new_momentum.append(m_next)
            new_weights.append(w_bar - m_next)
        if update_mask is not None:
            keep = update_mask[:, chunk, None, None]
            new_weights = [torch.where(keep, a, b) for a, b in zip(new_weights, weights)]
            new_momentum = [torch.where(keep, a, b) for a, b in zip(new_momentum, momentum)]
        weights, momentum = new_weights, new_momentum
        pending = []
    return torch.stack(outputs, dim=1), tuple(weights), tuple(momentum)
