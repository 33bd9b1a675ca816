"""Chunk-wise test-time training of the SwiGLU memory: the fast path.

Per chunk i (spec 1.3), all memories (N = batch x heads) at once:

    O_i = f_W~(Q_i)                                   read with the pristine weights
    W-  = rownorm(W~) * n0                            internal normalisation, after the read (none if n0 is None)
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
    """Run ``chunk_ttt``'s chunk steps through ``torch.compile``, or back to eager with False.

    Expansion 1 (every matrix d x d): the read and the write of a chunk are one graph, whose
    elementwise work between the matmuls inductor fuses into a few loops, and GROUP consecutive
    chunks that every memory writes are one graph of GROUP steps (``_stacked_group``; on 2 CPU
    cores ~0.5x the eager time at chunk 32, ``benchmarks/bench.py --op-only`` for chunk 128 up).
    Other expansions: the read and the write each compiled. One graph per shape (chunk, batch x
    heads, dtype, whether some memories skip the write); a partial last chunk is only read, eagerly."""
    if enabled:
        _STEP["read"] = torch.compile(swiglu_read, dynamic=False)
        _STEP["update"] = torch.compile(ttt_update, dynamic=False)
        _STEP["stacked"] = torch.compile(_stacked_step, dynamic=False)
        _STEP["group"] = torch.compile(_stacked_group, dynamic=False)
    else:
        _STEP.update(read=swiglu_read, update=ttt_update, stacked=_stacked_step, group=None)


def ttt_update(
    state: TTTState,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    beta: torch.Tensor,
    reference_norms: FastWeights | None,
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
        reference_norms: row norms n0 of the initial weights, [N or 1, rows, 1] per matrix; None
            skips the weight norm (the write lands on the weights as they are).
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


def _stacked_read(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """swiglu_read with the three matrices stacked in ``w`` [3, N, d, d] (expansion 1)."""
    width = w.shape[2]
    pre = z @ torch.cat([w[0], w[2]], dim=1).mT  # [N, T, 2F]: W1 z and W3 z in one matmul
    hidden = F.silu(pre[..., :width]) * pre[..., width:]
    return torch.baddbmm(z, hidden, w[1].mT)


def _stacked_update(w, m, k, out_base, eta, beta, n0, *, loss, clip, eps, apply):
    """ttt_update on stacked matrices (w, m, n0: [3, N, d, d] or [3, N, d, 1]): every
    normalise / clip / momentum step is one op for all three matrices, and the loss
    gradient folds its additions into fused matmuls. ``out_base`` is k - v (mse) or -v (dot)."""
    width = w.shape[2]
    w_n = w if n0 is None else w / (w.norm(dim=-1, keepdim=True) + eps) * n0
    pre = k @ torch.cat([w_n[0], w_n[2]], dim=1).mT  # [N, C, 2F]
    pre_gate, pre_up = pre[..., :width], pre[..., width:]
    gate_sig = torch.sigmoid(pre_gate)
    gate = pre_gate * gate_sig
    hidden = gate * pre_up
    out_grad = torch.baddbmm(out_base, hidden, w_n[1].mT) if loss == "mse" else out_base
    out_grad = out_grad * eta.unsqueeze(-1)
    grad_hidden = out_grad @ w_n[1]
    silu_prime = torch.addcmul(gate, gate_sig, 1 - gate)  # sigma + x sigma (1 - sigma)
    grads = torch.stack([(grad_hidden * pre_up * silu_prime).mT @ k, out_grad.mT @ hidden, (grad_hidden * gate).mT @ k])
    if clip is not None:
        norms = grads.flatten(2).norm(dim=2).clamp_min(1e-12)  # [3, N]
        grads = grads * (clip / norms).clamp(max=1.0)[..., None, None]
    new_m = torch.addcmul(grads, beta[None, :, None, None], m)
    new_w = w_n - new_m
    if apply is not None:
        keep = apply[None, :, None, None]
        new_w, new_m = torch.where(keep, new_w, w), torch.where(keep, new_m, m)
    return new_w, new_m


def _stacked_step(q, w, m, k, out_base, eta, beta, n0, *, loss, clip, eps, apply):
    """One writing chunk on stacked matrices: the read with the pristine weights, then the write.
    Returns (o [N, C, d], new w, new m)."""
    return (_stacked_read(q, w), *_stacked_update(w, m, k, out_base, eta, beta, n0, loss=loss, clip=clip, eps=eps,
                                                   apply=apply))


_STEP = {"read": swiglu_read, "update": ttt_update, "stacked": _stacked_step, "group": None}

# chunks per compiled graph: at chunk 32 on 2 CPU cores a graph of 8 chunks costs 0.37 ms a chunk against
# 0.57 for one-chunk graphs and 0.76 eager; it compiles in ~30 s, once per process and shape
GROUP = 8


def chunk_ttt(
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
    """Read and train the memory over a whole sequence, chunk by chunk.

    Args:
        q, k, v: [N, L, d] (N = batch x heads).
        eta: [N, L] token-wise learning rates (0 where a token must not write).
        beta: [N, ceil(L / chunk_size)] momentum coefficient of each chunk.
        initial_state: state before the first token.
        reference_norms: n0, row norms of the initial weights; None: no weight norm.
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
    if len(shapes) == 1:
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
    """chunk_ttt's loop for expansion 1 (all matrices d x d), on stacked matrices. Compiled
    (``set_compiled``), every run of GROUP chunks that all memories write goes as one graph."""
    if loss not in ("mse", "dot"):
        raise ValueError(f"unknown inner loss {loss!r}; choose one of ('mse', 'dot')")
    length = q.shape[1]
    w = torch.stack(initial_state.weights)
    m = torch.stack(initial_state.momentum)
    n0 = None if reference_norms is None else \
        torch.stack([r.expand_as(reference_norms[0]) for r in reference_norms]).expand(3, q.shape[0], -1, -1)
    out_base = k - v if loss == "mse" else -v  # once for the whole sequence
    num_chunks = -(-length // chunk_size)
    group = _STEP["group"]
    if group is not None:  # which chunks every memory writes, in one look rather than a sync per chunk
        every = [end <= length for end in range(chunk_size, num_chunks * chunk_size + 1, chunk_size)]
        if update_mask is not None:
            every = [e and bool(a) for e, a in zip(every, update_mask.all(0).tolist())]
    outputs = []
    i = 0
    while i < num_chunks:
        start = i * chunk_size
        if group is not None and i + GROUP <= num_chunks and all(every[i : i + GROUP]):
            end = start + GROUP * chunk_size
            o, w, m = group(q[:, start:end], w, m, k[:, start:end], out_base[:, start:end], eta[:, start:end],
                            beta[:, i : i + GROUP], n0, loss=loss, clip=clip, eps=eps)
            outputs.append(o)
            i += GROUP
            continue
        end = min(length, start + chunk_size)
        writes, apply = _chunk_writes(update_mask, i, full=end - start == chunk_size)
        if writes:
            o, w, m = _STEP["stacked"](q[:, start:end], w, m, k[:, start:end], out_base[:, start:end],
                                       eta[:, start:end], beta[:, i], n0, loss=loss, clip=clip, eps=eps, apply=apply)
        else:
            o = _stacked_read(q[:, start:end], w)
        outputs.append(o)
        i += 1
    return torch.cat(outputs, dim=1), TTTState(FastWeights(*w.unbind(0)), FastWeights(*m.unbind(0)))


def _stacked_group(q, w, m, k, out_base, eta, beta, n0, *, loss, clip, eps):
    """Consecutive chunks that every memory writes (beta [N, G]: G of them, each q.shape[1] / G
    tokens), one after the other: what ``set_compiled`` compiles as one graph, so that the
    elementwise work of all G chunks fuses and the call costs one graph launch, not G."""
    chunk = q.shape[1] // beta.shape[1]
    outputs = []
    for i in range(beta.shape[1]):
        part = slice(i * chunk, (i + 1) * chunk)
        o, w, m = _stacked_step(q[:, part], w, m, k[:, part], out_base[:, part], eta[:, part], beta[:, i], n0,
                                loss=loss, clip=clip, eps=eps, apply=None)
        outputs.append(o)
    return torch.cat(outputs, dim=1), w, m
