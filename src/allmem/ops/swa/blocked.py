"""Blocked sliding-window attention with sinks: prefill in O(T (W + S)) time and memory.

Queries are cut into blocks of ``block`` tokens. A block's window keys all lie in one
contiguous span of ``block + W - 1`` keys ending at the block's last query, so each block
is one batched matmul against an unfolded view of the keys, plus one against the S sinks;
both are merged under a single softmax. No T x T mask exists at any point.

Same contract as ``naive.swa_dense`` with one structural promise: keys are the P past
tokens followed by the T query tokens, contiguous in position, so query j is key P + j:

    q, q_sink  [B, Hkv, G, T, D]     k, v  [B, Hkv, P + T, D]    key_pos [B, P + T]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import merged_softmax_attention, sink_mask, window_mask

# Cap on score elements materialised at once (about 256 MiB in float32).
_MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


def swa_blocked(
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
    block: int | None = None,
) -> torch.Tensor:
    """Returns [B, Hkv, G, T, D]."""
    batch, kv_heads, groups, length, dim = q.shape
    past = k.shape[2] - length
    if past < 0:
        raise ValueError(f"k has {k.shape[2]} positions, fewer than the {length} queries")
    block = min(block or min(window, 128), length)
    span = block + window - 1
    num_blocks = -(-length // block)
    padded = num_blocks * block

    # keys of query j live at [P + j - W + 1, P + j]; pad W - 1 in front so every span exists
    keep_from = max(0, past - (window - 1))
    front = (window - 1) - (past - keep_from)
    back = padded - length
    k_all = F.pad(k[:, :, keep_from:], (0, 0, front, back))
    v_all = F.pad(v[:, :, keep_from:], (0, 0, front, back))
    pos_all = F.pad(key_pos[:, keep_from:], (front, back), value=-1)
    k_blocks = k_all.unfold(2, span, block)  # [B, Hkv, nb, D, span]
    v_blocks = v_all.unfold(2, span, block).transpose(-1, -2)  # [B, Hkv, nb, span, D]
    pos_blocks = pos_all.unfold(1, span, block)  # [B, nb, span]

    q_blocks = F.pad(q, (0, 0, 0, back)).view(batch, kv_heads, groups, num_blocks, block, dim)
    qpos_blocks = F.pad(query_pos, (0, back), value=-1).view(batch, num_blocks, block)
    use_sinks = k_sink is not None and k_sink.shape[2] > 0
    if use_sinks:
        q_sink = q if q_sink is None else q_sink
        q_sink_blocks = F.pad(q_sink, (0, 0, 0, back)).view(batch, kv_heads, groups, num_blocks, block, dim)
        k_sink_t = k_sink[:, :, None, None].mT  # [B, Hkv, 1, 1, D, S]
        v_sink_b = v_sink[:, :, None, None]

    neg = torch.finfo(torch.float32).min
    per_block = batch * kv_heads * groups * block * (span + (k_sink.shape[2] if use_sinks else 0))
    step = max(1, _MAX_SCORE_ELEMENTS // max(per_block, 1))
    outputs = []
    for first in range(0, num_blocks, step):
        sl = slice(first, first + step)
        qp = qpos_blocks[:, None, None, sl, :, None]  # [B, 1, 1, nb, block, 1]
        scores = (q_blocks[:, :, :, sl] @ k_blocks[:, :, None, sl]) * scale
        visible = window_mask(qp, pos_blocks[:, None, None, sl, None, :], window)
        scores = scores.float().masked_fill(~visible, neg)
        values = v_blocks[:, :, None, sl]
        if use_sinks:
            sink_scores = (q_sink_blocks[:, :, :, sl] @ k_sink_t) * scale
            sink_visible = sink_mask(qp, sink_pos[:, None, None, None, None, :], window)
            sink_scores = sink_scores.float().masked_fill(~sink_visible, neg)
            outputs.append(merged_softmax_attention(scores, sink_scores, values, v_sink_b))
        else:
            outputs.append(merged_softmax_attention(scores, None, values, None))
    out = torch.cat(outputs, dim=3).reshape(batch, kv_heads, groups, padded, dim)
    return out[:, :, :, :length]
