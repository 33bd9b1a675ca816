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
import torch.nn.functional as F

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
    residual: bool = True,
) -> TTTState:
    """One memory write from one chunk.

    Args:
        state: fast weights and momentum, each matrix [N, ., .].
        k, v: [N, C, d] keys and values of the chunk.
        eta: [N, C] token-wise learning rates.
        beta: [N] momentum coefficient of the chunk.
        reference_norms: row norms n0 of the initial weights, [N or 1, rows, 1] per matrix.
        apply: optional [N] bool; where false the state is returned unchanged.
        residual: False trains f_W(z) = W2(silu(W1 z) * W3 z), the network without its skip.
    """
    v = _skip_free_values(k, v, loss, residual)
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


def _skip_free_values(k: torch.Tensor, v: torch.Tensor, loss: str, residual: bool) -> torch.Tensor:
    """Values that make the skip-ful network's inner gradient equal the skip-free one's.

    mse: f(k) - (v + k) = W2 h(k) - v, so training z + W2 h(z) towards v + k is training
    W2 h(z) towards v. dot: the gradient -v does not involve the skip at all."""
    return v + k if not residual and loss == "mse" else v


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
    residual: bool = True,
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
        residual: True (the spec) reads and trains f_W(z) = z + W2 h(z); False reads and
            trains W2 h(z) alone (the skip removed from both; same state, same shapes).

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
    if not residual:  # the skip-ful op on shifted values, then the skip taken off every read
        o, state = chunk_ttt(q, k, _skip_free_values(k, v, loss, False), eta, beta, initial_state, reference_norms,
                             chunk_size=chunk_size, loss=loss, clip=clip, eps=eps, update_mask=update_mask)
        return o - q, state

    shapes = {tuple(w.shape) for w in (*initial_state.weights, *initial_state.momentum)}
    if len(shapes) == 1 and _STEP["update"] is ttt_update:
        return _chunk_loop_stacked(q, k, v, eta, beta, initial_state, reference_norms, chunk_size, loss, clip, eps,
                                   update_mask)
    state = initial_state
    outputs = []
    for i in range(num_chunks):
        start, end = i * chunk_size, min(length, (i + 1) * chunk_size)
        outputs.append(_STEP["read"](q[:, start:end], state.weights))
        writes, apply = _chunk_writes(update_mask, i, full=end - start == chunk_size)
        if not writes:
            continue
        state = _STEP["update"](
            state, k[:, start:end], v[:, start:end], eta[:, start:end], beta[:, i], reference_norms,
            loss=loss, clip=clip, eps=eps, apply=apply,
        )
    return torch.cat(outputs, dim=1), state


def _chunk_writes(update_mask: torch.Tensor | None, i: int, full: bool) -> tuple[bool, torch.Tensor | None]:
    """Whether chunk ``i`` writes at all, and the per-memory ``apply`` mask (None: all write).
    Without a mask every full chunk writes and a partial last chunk is buffered."""
    if update_mask is None:
        return full, None
    apply = update_mask[:, i]
    if not bool(apply.any()):
        return False, None
    return True, None if bool(apply.all()) else apply


def _chunk_loop_stacked(q, k, v, eta, beta, initial_state, reference_norms, chunk_size, loss, clip, eps, update_mask):
    """chunk_ttt's loop for expansion 1 (all matrices d x d), in as few ops per chunk as the
    math allows (the chunk step is ~25 small ops, so per-op overhead is what it costs).

    The three matrices live in one [N, 3, d, d] tensor ordered (W1, W3, W2), so W1 and W3
    are one [N, 2d, d] matrix and every normalise / clip / momentum step is one op. A chunk's
    read (pristine W~ on the queries) and its inner forward (normalised W- on the keys) share
    each matmul: W- = s * W~ row-wise, so k W-^T = (k W~^T) * s, and the chunk's queries and
    keys go through W1|W3 and then W2 together, the key half rescaled by s in between.
    Without autograd the state, momentum and scratch buffers are updated in place."""
    if loss not in ("mse", "dot"):
        raise ValueError(f"unknown inner loss {loss!r}; choose one of ('mse', 'dot')")
    n, length, d = q.shape
    c = chunk_size
    inplace = not torch.is_grad_enabled()
    ws, ms = initial_state.weights, initial_state.momentum
    w = torch.stack([ws.w1, ws.w3, ws.w2], dim=1)  # [N, 3, d, d]: a copy, ours to update in place
    m = torch.stack([ms.w1, ms.w3, ms.w2], dim=1)
    n0 = torch.stack([r.expand(n, d, 1) for r in (reference_norms.w1, reference_norms.w3, reference_norms.w2)], dim=1)
    full = length // c
    writes_any, writes_all = _mask_summary(update_mask, -(-length // c))
    # once per sequence: queries and keys of each chunk side by side [N, nc, 2C, d], and the
    # eta-weighted constant part of the output gradient ((k - v) for mse, -v for dot)
    x = torch.cat([q[:, : full * c].view(n, full, c, d), k[:, : full * c].view(n, full, c, d)], dim=2)
    k_chunks = k[:, : full * c].view(n, full, c, d)
    eta_chunks = eta[:, : full * c].view(n, full, c, 1)
    base = ((k - v) if loss == "mse" else -v)[:, : full * c].view(n, full, c, d) * eta_chunks
    grads = torch.empty_like(w) if inplace else None
    reads = []
    for i in range(full):
        w13, w2 = w[:, :2].reshape(n, 2 * d, d), w[:, 2]
        scale = n0 / (torch.linalg.vector_norm(w, dim=-1, keepdim=True) + eps)  # [N, 3, d, 1]: W- = scale * W~
        pre = x[:, i] @ w13.mT  # [N, 2C, 2d]: W1 z | W3 z, queries (pristine) then keys
        key_scale = scale[:, :2].reshape(n, 1, 2 * d)
        if inplace:
            pre[:, c:].mul_(key_scale)
        else:
            pre = torch.cat([pre[:, :c], pre[:, c:] * key_scale], dim=1)
        pre_gate, pre_up = pre[..., :d], pre[..., d:]
        gate_sig = torch.sigmoid(pre_gate)
        gate = pre_gate * gate_sig
        hidden = gate * pre_up
        out = hidden @ w2.mT  # [N, 2C, d]
        reads.append(out[:, :c])
        if not writes_any[i]:
            continue
        if loss == "mse":  # eta (f(k) - v) = eta (k - v) + eta (s2 * W2~ h)
            out_grad = torch.addcmul(base[:, i], out[:, c:] * scale[:, 2].mT, eta_chunks[:, i])
        else:
            out_grad = base[:, i]
        w_n = w * scale  # W-
        grad_hidden = out_grad @ w_n[:, 2]  # [N, C, d]
        gate_sig_k, gate_k, up_k, hidden_k = gate_sig[:, c:], gate[:, c:], pre_up[:, c:], hidden[:, c:]
        silu_prime = torch.addcmul(gate_sig_k, gate_k, 1 - gate_sig_k)  # sigma + x sigma (1 - sigma)
        k_i = k_chunks[:, i]
        if inplace:
            grad_pre = torch.empty(n, c, 2 * d, dtype=q.dtype, device=q.device)
            torch.mul(grad_hidden * up_k, silu_prime, out=grad_pre[..., :d])
            torch.mul(grad_hidden, gate_k, out=grad_pre[..., d:])
            torch.matmul(grad_pre.mT, k_i, out=grads[:, :2].view(n, 2 * d, d))
            torch.matmul(out_grad.mT, hidden_k, out=grads[:, 2])
            g = grads
        else:
            grad_pre = torch.cat([grad_hidden * up_k * silu_prime, grad_hidden * gate_k], dim=-1)
            g = torch.cat([(grad_pre.mT @ k_i).view(n, 2, d, d), (out_grad.mT @ hidden_k)[:, None]], dim=1)
        factor = None
        if clip is not None:  # per matrix of every memory: [N, 3]
            factor = (clip / torch.linalg.vector_norm(g.flatten(2), dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            factor = factor[..., None, None]
        b = beta[:, i, None, None, None]
        if inplace and writes_all[i]:
            m.mul_(b)
            m = m.addcmul_(g, factor) if factor is not None else m.add_(g)
            w = w_n.sub_(m)
            continue
        new_m = torch.addcmul(g * factor if factor is not None else g, b, m)
        new_w = w_n - new_m
        if writes_all[i]:
            w, m = new_w, new_m
        else:
            keep = update_mask[:, i, None, None, None]
            w, m = torch.where(keep, new_w, w), torch.where(keep, new_m, m)
    if full * c < length:  # a partial last chunk is read, never written (it is buffered)
        w13, w2 = w[:, :2].reshape(n, 2 * d, d), w[:, 2]
        pre = q[:, full * c :] @ w13.mT
        reads.append((F.silu(pre[..., :d]) * pre[..., d:]) @ w2.mT)
    o = q + torch.cat(reads, dim=1)
    unstack = lambda t: FastWeights(t[:, 0].contiguous(), t[:, 2].contiguous(), t[:, 1].contiguous())  # noqa: E731
    return o, TTTState(unstack(w), unstack(m))


def _mask_summary(update_mask: torch.Tensor | None, num_chunks: int) -> tuple[list[bool], list[bool]]:
    """Per chunk: whether any memory writes, whether all do (two host syncs for the whole
    sequence instead of two per chunk). Without a mask every full chunk writes."""
    if update_mask is None:
        return [True] * num_chunks, [True] * num_chunks
    return update_mask.any(0).tolist(), update_mask.all(0).tolist()
