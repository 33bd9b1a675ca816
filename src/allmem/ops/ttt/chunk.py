"""Chunk-wise test-time training of the SwiGLU memory: the fast path.

Per chunk i (spec 1.3), all memories (N = batch x heads) at once:

    O_i = f_W~(Q_i)                                   read with the pristine weights
    W-  = rownorm(W~) * n0                            internal normalisation, after the read
    G   = clip(grad_W sum_{t in i} eta_t l(f_W(k_t), v_t) at W-)
    M   = beta_i M + G
    W~  = W- - M                                      write

Only the loop over chunks is sequential; every chunk is a handful of batched matmuls.
A chunk whose ``update_mask`` is false is read but leaves the state untouched: that is how
a partial last chunk is buffered and how padding rows are kept out of the memory.
"""

from __future__ import annotations

import torch

from .fast_weights import (
    FastWeights,
    TTTState,
    clip_per_matrix,
    renormalise,
    swiglu_loss_grads,
    swiglu_read,
)


def set_compiled(enabled: bool = True) -> None:
    """Run ``chunk_ttt``'s per-chunk read and write through ``torch.compile`` (on a GPU this
    fuses the elementwise work between the matmuls), or back to eager with False."""
    if enabled:
        _STEP["read"] = torch.compile(swiglu_read, dynamic=False)
        _STEP["update"] = torch.compile(ttt_update, dynamic=False)
    else:
        _STEP.update(read=swiglu_read, update=ttt_update)


def ttt_update(
    state: TTTState,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    beta: torch.Tensor,
    reference_norms: FastWeights,
    *,
    loss: str = "mse",
    clip: float | None = 1.0,
    eps: float = 1e-5,
    apply: torch.Tensor | None = None,
) -> TTTState:
    """One memory write from one chunk.

    Args:
        state: fast weights and momentum, each matrix [N, ., .].
        k, v: [N, C, d] keys and values of the chunk.
        eta: [N, C] token-wise learning rates.
        beta: [N] momentum coefficient of the chunk.
        reference_norms: row norms n0 of the initial weights, [N or 1, rows, 1] per matrix.
        apply: optional [N] bool; where false the state is returned unchanged.
    """
    normalised = renormalise(state.weights, reference_norms, eps)
    grads = swiglu_loss_grads(k, v, eta, normalised, loss)
    if clip is not None:
        grads = clip_per_matrix(grads, clip)
    beta = beta[:, None, None]
    momentum = FastWeights(*(beta * m + g for m, g in zip(state.momentum, grads)))
    weights = FastWeights(*(w - m for w, m in zip(normalised, momentum)))
    if apply is not None:
        keep = apply[:, None, None]
        weights = FastWeights(*(torch.where(keep, new, old) for new, old in zip(weights, state.weights)))
        momentum = FastWeights(*(torch.where(keep, new, old) for new, old in zip(momentum, state.momentum)))
    return TTTState(weights, momentum)


_STEP = {"read": swiglu_read, "update": ttt_update}


def chunk_ttt(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    beta: torch.Tensor,
    initial_state: TTTState,
    reference_norms: FastWeights,
    *,
    chunk_size: int,
    loss: str = "mse",
    clip: float | None = 1.0,
    eps: float = 1e-5,
    update_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TTTState]:
    """Read and train the memory over a whole sequence, chunk by chunk.

    Args:
        q, k, v: [N, L, d] (N = batch x heads).
        eta: [N, L] token-wise learning rates (0 where a token must not write).
        beta: [N, ceil(L / chunk_size)] momentum coefficient of each chunk.
        initial_state: state before the first token.
        reference_norms: n0, row norms of the initial weights.
        update_mask: [N, ceil(L / chunk_size)] bool, whether each chunk writes; by default
            every full chunk writes and a partial last chunk does not (it is buffered).

    Returns:
        o: [N, L, d], the reads; final_state: the state after the last written chunk.
    """
    n, length, _ = q.shape
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num_chunks = -(-length // chunk_size)
    if beta.shape != (n, num_chunks):
        raise ValueError(f"beta must have shape {(n, num_chunks)} (one per chunk), got {tuple(beta.shape)}")
    if update_mask is not None and update_mask.shape != (n, num_chunks):
        raise ValueError(f"update_mask must have shape {(n, num_chunks)}, got {tuple(update_mask.shape)}")

    state = initial_state
    outputs = []
    for i in range(num_chunks):
        start, end = i * chunk_size, min(length, (i + 1) * chunk_size)
        outputs.append(_STEP["read"](q[:, start:end], state.weights))
        if update_mask is None:
            if end - start < chunk_size:
                continue  # a partial last chunk is buffered, never written
            apply = None
        else:
            apply = update_mask[:, i]
            if not bool(apply.any()):
                continue
            if bool(apply.all()):
                apply = None
        state = _STEP["update"](
            state, k[:, start:end], v[:, start:end], eta[:, start:end], beta[:, i], reference_norms,
            loss=loss, clip=clip, eps=eps, apply=apply,
        )
    return torch.cat(outputs, dim=1), state
