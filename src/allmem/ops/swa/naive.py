"""Sliding-window attention with sinks over an explicit key list: the dense form.

Every query sees every given key, masked by positions. O(T x K) memory, so it serves
decoding (T = 1, K = S + W) and as the reference the blocked prefill is tested against.

Shapes (G = query heads per key/value head):
    q, q_sink     [B, Hkv, G, T, D]   q_sink: the query rotated at its sink-view position
    k, v          [B, Hkv, K, D]      window candidates, any order
    key_pos       [B, K]              absolute position of each key, negative = empty slot
    query_pos     [B, T]
    k_sink, v_sink [B, Hkv, S, D]
    sink_pos      [B, S]              negative = not yet seen

Rule: a query at position t attends a window key at p when t - W < p <= t, and a sink at
p when 0 <= p <= t - W (a sink still inside the window is attended once, as a window key).
"""

from __future__ import annotations

import torch


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[..., T, 1] x [..., 1, K] -> bool [..., T, K]."""
    return (key_pos >= 0) & (key_pos <= query_pos) & (key_pos > query_pos - window)


def sink_mask(query_pos: torch.Tensor, sink_pos: torch.Tensor, window: int) -> torch.Tensor:
    return (sink_pos >= 0) & (sink_pos <= query_pos - window)


def merged_softmax_attention(
    scores_window: torch.Tensor,
    scores_sink: torch.Tensor | None,
    v: torch.Tensor,
    v_sink: torch.Tensor | None,
) -> torch.Tensor:
    """One softmax over window and sink scores, float32 inside.

    Masked entries hold the most negative finite float, so a query with no valid key (a
    padding query, whose output is discarded) averages instead of producing NaN.
    """
    if scores_sink is None:
        probs = torch.softmax(scores_window.float(), dim=-1).to(v.dtype)
        return probs @ v
    scores = torch.cat([scores_window, scores_sink], dim=-1).float()
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    num_window = scores_window.shape[-1]
    return probs[..., :num_window] @ v + probs[..., num_window:] @ v_sink


def swa_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    *,
    window: int,
    scale: float,
    q_sink: torch.Tensor | None = None,
    k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
    sink_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns [B, Hkv, G, T, D]."""
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # broadcast over the G query heads of a group
    qp = query_pos[:, None, None, :, None]
    neg = torch.finfo(torch.float32).min
    scores = (q @ k.mT) * scale
    scores = scores.float().masked_fill(~window_mask(qp, key_pos[:, None, None, None, :], window), neg)
    if k_sink is None or k_sink.shape[2] == 0:
        return merged_softmax_attention(scores, None, v, None)
    q_sink = q if q_sink is None else q_sink
    k_sink, v_sink = k_sink.unsqueeze(2), v_sink.unsqueeze(2)
    sink_scores = (q_sink @ k_sink.mT) * scale
    sink_scores = sink_scores.float().masked_fill(~sink_mask(qp, sink_pos[:, None, None, None, :], window), neg)
    return merged_softmax_attention(scores, sink_scores, v, v_sink)
