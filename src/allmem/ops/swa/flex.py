"""Sliding-window attention with sinks through ``torch.nn.attention.flex_attention``: the GPU path.

Same contract and rule as ``naive.swa_dense`` (see there for shapes). FlexAttention skips
every fully masked 128 x 128 block, so prefill costs O(T (W + S)) on the GPU with a fused
kernel and no T x K score tensor.

Sinks can be seen through a query rotated differently from the window query (``rolling``
positions). One kernel still serves both: queries and keys are widened to 2D channels,

    q' = [q_win, q_sink]      window key' = [k, 0]      sink key' = [0, k_sink]

so that q'.k' is q_win.k for window keys and q_sink.k_sink for sinks, under one softmax.
Keys are laid out as the S sink slots followed by the K window candidates.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def swa_flex(
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
    compiled: bool | None = None,
) -> torch.Tensor:
    """Returns [B, Hkv, G, T, D]. ``compiled`` defaults to True on CUDA (the fused kernel);
    the eager form (CPU, tests) materialises scores and is for checking only."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, kv_heads, groups, length, dim = q.shape
    compiled = q.is_cuda if compiled is None else compiled
    sinks = 0 if k_sink is None else k_sink.shape[2]
    q_flat = q.reshape(batch, kv_heads * groups, length, dim)
    if sinks:
        q_sink = q if q_sink is None else q_sink
        q_flat = torch.cat([q_flat, q_sink.reshape(batch, kv_heads * groups, length, dim)], dim=-1)
        zeros_k = k.new_zeros(k.shape)
        zeros_s = k_sink.new_zeros(k_sink.shape)
        k_all = torch.cat([torch.cat([zeros_s, k_sink], dim=-1), torch.cat([k, zeros_k], dim=-1)], dim=2)
        v_all = torch.cat([v_sink, v], dim=2)
        sink_pos_all = sink_pos
    else:
        k_all, v_all = k, v
        sink_pos_all = key_pos.new_full((batch, 1), -1)

    def mask_mod(b, h, qi, ki):
        qp = query_pos[b, qi]
        kp = key_pos[b, (ki - sinks).clamp(min=0)]
        in_window = (kp >= 0) & (kp <= qp) & (kp > qp - window)
        if not sinks:
            return in_window
        sp = sink_pos_all[b, ki.clamp(max=sinks - 1)]
        sink_visible = (sp >= 0) & (sp <= qp - window)
        return torch.where(ki < sinks, sink_visible, in_window)

    block_mask = create_block_mask(mask_mod, batch, None, length, k_all.shape[2], device=q.device, _compile=compiled)
    out = _kernel(compiled)(q_flat, k_all, v_all, block_mask=block_mask, scale=scale, enable_gqa=groups > 1)
    return out.reshape(batch, kv_heads, groups, length, v.shape[-1])
