"""Token-by-token reference of the chunked memory, for tests only.

Independent of the fast path on purpose: its own SwiGLU forward, gradients by autograd
(``create_graph=True`` so outer-loop gradients can be compared too), a Python loop over
tokens that buffers keys until a chunk is full. Use float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fast_weights import FastWeights, TTTState  # the containers only: no math is shared


def _fast_net(z: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, residual: bool) -> torch.Tensor:
    # z [N, d]; explicit einsums so no code is shared with the fast path
    hidden = F.silu(torch.einsum("nfd,nd->nf", w1, z)) * torch.einsum("nfd,nd->nf", w3, z)
    out = torch.einsum("ndf,nf->nd", w2, hidden)
    return z + out if residual else out


def naive_ttt(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    beta: torch.Tensor,
    initial_state: TTTState,
    reference_norms: FastWeights | None,
    *,
    chunk_size: int,
    loss: str = "mse",
    clip: float | None = 1.0,
    eps: float = 1e-5,
    update_mask: torch.Tensor | None = None,
    residual: bool = True,
) -> tuple[torch.Tensor, TTTState]:
    """Same call as ``chunk_ttt``: q, k, v [N, L, d]; eta [N, L]; beta [N, num_chunks];
    initial_state fast weights and momentum, each matrix [N, ., .]; reference_norms n0 (None: no
    weight norm, every chunk writes on the weights as they are);
    update_mask [N, num_chunks] or None. Only full chunks write (a partial last chunk is
    buffered). residual=False reads and trains W2 h(z) alone (no skip).

    Returns (o [N, L, d], final_state).
    """
    n, length, _ = q.shape
    weights, momentum = list(initial_state.weights), list(initial_state.momentum)
    outputs = []
    pending: list[int] = []
    for t in range(length):
        outputs.append(_fast_net(q[:, t], *weights, residual))
        pending.append(t)
        if len(pending) < chunk_size:
            continue
        chunk = t // chunk_size
        normalised = []
        for i, w in enumerate(weights):
            if reference_norms is None:
                w_bar = w
            else:
                row_norm = torch.sqrt((w * w).sum(dim=-1, keepdim=True))
                w_bar = w / (row_norm + eps) * reference_norms[i]
            # a constant state still needs a graph for autograd to differentiate the inner loss
            normalised.append(w_bar if w_bar.requires_grad else w_bar.detach().requires_grad_())
        total = 0.0
        for s in pending:
            pred = _fast_net(k[:, s], *normalised, residual)
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
    return torch.stack(outputs, dim=1), TTTState(FastWeights(*weights), FastWeights(*momentum))
