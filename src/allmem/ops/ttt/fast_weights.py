"""Residual SwiGLU fast weights: forward, closed-form loss gradients, normalisation, clipping.

Every function works on a flat leading dimension N = batch x heads so that one batched
matmul covers all memories at once. Shapes:

    z, k, v     [N, T, d]        tokens of one chunk (d = memory head dim)
    w1, w3      [N, F, d]        F = e * d, e the SwiGLU expansion
    w2          [N, d, F]
    eta         [N, T]           token-wise inner learning rate (0 for padding)

    f_W(z) = z + W2 (silu(W1 z) * (W3 z))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

INNER_LOSSES = ("mse", "dot")


class FastWeights(NamedTuple):
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor


class TTTState(NamedTuple):
    """Inner-loop state of the memory: fast weights and their momentum, same shapes."""

    weights: FastWeights
    momentum: FastWeights


def swiglu_read(z: torch.Tensor, weights: FastWeights) -> torch.Tensor:
    """Apply the fast-weight network to every token: [N, T, d] -> [N, T, d]."""
    w1, w2, w3 = weights
    hidden = F.silu(z @ w1.mT) * (z @ w3.mT)  # [N, T, F]
    return z + hidden @ w2.mT


def swiglu_loss_grads(
    k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, weights: FastWeights, loss: str
) -> FastWeights:
    """Closed-form gradient of sum_t eta_t * loss(f_W(k_t), v_t) with respect to (W1, W2, W3).

    loss "mse": 1/2 ||f_W(k) - v||^2, whose output gradient is f_W(k) - v.
    loss "dot": -<f_W(k), v>, whose output gradient is -v.
    """
    w1, w2, w3 = weights
    pre_gate = k @ w1.mT  # [N, T, F]
    pre_up = k @ w3.mT  # [N, T, F]
    gate_sig = torch.sigmoid(pre_gate)
    gate = pre_gate * gate_sig  # silu
    hidden = gate * pre_up
    if loss == "mse":
        out_grad = k + hidden @ w2.mT - v
    elif loss == "dot":
        out_grad = -v
    else:
        raise ValueError(f"unknown inner loss {loss!r}; choose one of {INNER_LOSSES}")
    out_grad = out_grad * eta.unsqueeze(-1)  # [N, T, d]
    grad_w2 = out_grad.mT @ hidden  # [N, d, F]
    grad_hidden = out_grad @ w2  # [N, T, F]
    silu_prime = gate_sig * (1 + pre_gate * (1 - gate_sig))
    grad_pre_gate = grad_hidden * pre_up * silu_prime
    grad_pre_up = grad_hidden * gate
    return FastWeights(grad_pre_gate.mT @ k, grad_w2, grad_pre_up.mT @ k)


def row_norms(weights: FastWeights) -> FastWeights:
    """Norm of every row (the input dimension, the one that dots with the input): [N, rows, 1]."""
    return FastWeights(*(w.norm(dim=-1, keepdim=True) for w in weights))


def renormalise(weights: FastWeights, reference_norms: FastWeights | None, eps: float) -> FastWeights:
    """Rescale every row of each matrix to the reference row norm (the paper's weight norm);
    ``reference_norms`` None leaves the weights as they are (no weight norm)."""
    if reference_norms is None:
        return weights
    return FastWeights(
        *(w / (w.norm(dim=-1, keepdim=True) + eps) * n for w, n in zip(weights, reference_norms))
    )


def clip_per_matrix(grads: FastWeights, max_norm: float) -> FastWeights:
    """G * min(1, max_norm / ||G||_F), separately for every matrix of every memory."""
    clipped = []
    for g in grads:
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)  # [N]
        scale = (max_norm / norm).clamp(max=1.0)
        clipped.append(g * scale[:, None, None])
    return FastWeights(*clipped)
