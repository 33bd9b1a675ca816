"""Sliding-window attention with sinks through PyTorch's fused CPU attention kernel (inference).

The window part is one call of the flash-attention kernel PyTorch uses for
``scaled_dot_product_attention`` on CPU, with an additive T x K window mask; the kernel also
returns each row's log-sum-exp, so the S sink scores (rolled by their own query rotation,
``q_sink``) are merged exactly afterwards: out = out_w * e^(lse_w - lse) + softmax-part of the
sinks. At 1k tokens and W = 256 this is ~1.5x faster than ``swa_blocked`` on 2 cores
(benchmarks/profile_1k.py). ``swa_prefill`` uses it for no-grad calls, with ``block`` (below) so
that the mask stays block x (block + W) at any length, and ``swa_blocked`` for training.

Same contract as ``naive.swa_dense`` (the reference):

    q, q_sink [B, Hkv, G, T, D]   k, v [B, Hkv, K, D]   key_pos [B, K]   query_pos [B, T]
    k_sink, v_sink [B, Hkv, S, D]   sink_pos [B, S]     -> [B, Hkv, G, T, D]

With ``block``, also ``swa_blocked``'s structural promise (the keys are P past tokens followed by
the T queries, contiguous in position: query j is key P + j), and the queries go in blocks of
``block``, each against only its band of block + W - 1 keys: T x (block + W) scores instead of
T x K, and a mask of block x (block + W) whatever the length.
"""

from __future__ import annotations

import torch

from .naive import sink_mask, window_mask

# the largest window mask one call of the kernel gets (B x T x K, or B x block x (block + W) in blocks):
# 16M elements, 64 MB in float32
MAX_MASK_ELEMENTS = 16 * 1024 * 1024


def sdpa_available() -> bool:
    """PyTorch's CPU flash-attention op, which returns the log-sum-exp (a private ATen op)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def additive_window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int, dtype: torch.dtype,
                         cache: dict | None = None) -> torch.Tensor:
    """[B, T] x [B, K] positions -> the kernel's additive mask [B, 1, T, K]: 0 where the window
    rule lets the query see the key, else the most negative finite float (finite, so a row that sees
    nothing, a padding query, averages instead of giving NaN, as in swa_blocked). With ``cache``,
    a mask built for the same positions, window and dtype before is returned instead."""
    entries = None
    if cache is not None:
        entries = cache.setdefault(("swa_mask", window, dtype, query_pos.device, query_pos.shape, key_pos.shape), [])
        for cached_query_pos, cached_key_pos, mask in entries:
            if torch.equal(cached_query_pos, query_pos) and torch.equal(cached_key_pos, key_pos):
                return mask
    visible = window_mask(query_pos[:, None, :, None], key_pos[:, None, None, :], window)  # [B, 1, T, K]
    mask = torch.zeros(visible.shape, dtype=dtype, device=query_pos.device).masked_fill(~visible, torch.finfo(dtype).min)
    if entries is not None:
        entries.append((query_pos, key_pos, mask))
    return mask


def swa_sdpa(
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
    mask_cache: dict | None = None,
) -> torch.Tensor:
    """Returns [B, Hkv, G, T, D]. ``mask_cache``: a dict kept across calls whose queries and keys
    mostly sit at the same positions (the layers of one forward): each distinct window mask is
    built once and found again by its positions."""
    out, lse = _window_part(q, k, v, key_pos, query_pos, window, scale, block, mask_cache)
    if k_sink is None or k_sink.shape[2] == 0:
        return out
    seen = sink_mask(query_pos[:, None, None, :, None], sink_pos[:, None, None, None, :], window)
    if not bool(seen.any()):  # no query is old enough to see a sink (the first W tokens)
        return out
    # once for all the blocks: the merge is a dozen small ops, not worth repeating per block
    wide = torch.promote_types(q.dtype, torch.float32)  # the merge in float32 at least, as swa_blocked's softmax
    lse = lse.to(wide)
    q_sink = q if q_sink is None else q_sink
    sink_scores = ((q_sink @ k_sink[:, :, None].mT) * scale).to(wide)  # [B, Hkv, G, T, S]
    sink_scores = sink_scores.masked_fill(~seen, float("-inf"))
    total = torch.logaddexp(lse, torch.logsumexp(sink_scores, dim=-1, keepdim=True))
    sink_probs = torch.exp(sink_scores - total).to(v_sink.dtype)
    return (out * torch.exp(lse - total).to(out.dtype)) + sink_probs @ v_sink[:, :, None]


def _window_part(q, k, v, key_pos, query_pos, window, scale, block, mask_cache):
    """The window keys alone: (out [B, Hkv, G, T, D], log-sum-exp [B, Hkv, G, T, 1]), the queries
    in blocks of ``block`` against their bands of keys."""
    length, past = q.shape[3], k.shape[2] - q.shape[3]
    if block is not None and length > block:
        parts = []
        for start in range(0, length, block):
            end = min(start + block, length)
            lo = max(0, past + start - window + 1)  # the oldest key the block's first query can see
            parts.append(_window_part(q[:, :, :, start:end], k[:, :, lo : past + end], v[:, :, lo : past + end],
                                      key_pos[:, lo : past + end], query_pos[:, start:end], window, scale, None,
                                      mask_cache))
        return torch.cat([o for o, _ in parts], dim=3), torch.cat([lse for _, lse in parts], dim=3)
    batch, kv_heads, groups, length, dim = q.shape
    mask = additive_window_mask(query_pos, key_pos, window, q.dtype, mask_cache)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(batch, kv_heads * groups, length, dim),
        k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
        0.0, False, attn_mask=mask, scale=scale,
    )
    return out.view(batch, kv_heads, groups, length, dim), lse.view(batch, kv_heads, groups, length, 1)
