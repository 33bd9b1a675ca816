"""REFERENCE ONLY (tests): the whole Mamba-2 mixer as a plain token-by-token loop in float64.

Slow and simple on purpose; ``allmem.baselines.mamba2.Mamba2Memory`` must agree with it. The
scan alone has its reference in ``allmem.ops.ssd.naive``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mamba2 import Mamba2Memory, Mamba2State


@torch.no_grad()
def naive_mamba2_forward(module: Mamba2Memory, x: torch.Tensor, seq_lens: torch.Tensor,
                         state: Mamba2State | None = None) -> tuple[torch.Tensor, Mamba2State]:
    """The whole mixer, row by row and token by token, in float64. x [B, T, d] aligned.
    Returns the output (zeros at padding) and the state after each row's real tokens."""
    p = {n: t.detach().double() for n, t in module.named_parameters()}
    batch, length, hidden = x.shape
    H, P, N, K = module.heads, module.head_dim, module.state_size, module.conv_kernel
    inner, conv_dim = module.inner, module.conv_dim
    A = -torch.exp(p["A_log"])
    out = torch.zeros(batch, length, hidden, dtype=torch.float64)
    ssm_out, conv_out = [], []
    for b in range(batch):
        h = torch.zeros(H, P, N, dtype=torch.float64) if state is None else state.ssm[b].double().clone()
        history = [torch.zeros(conv_dim, dtype=torch.float64) for _ in range(K - 1)]
        if state is not None:
            history = [state.conv[b, i].double() for i in range(K - 1)]
        for t in range(int(seq_lens[b])):
            proj = p["in_proj.weight"] @ x[b, t].double()
            z, xbc, dt_raw = proj[:inner], proj[inner:inner + conv_dim], proj[inner + conv_dim:]
            window = history[len(history) - (K - 1):] + [xbc] if K > 1 else [xbc]
            conv = p["conv_bias"].clone()
            for k in range(K):  # tap k multiplies the input K-1-k steps back
                conv = conv + p["conv_weight"][:, k] * window[k]
            history.append(xbc)
            xbc = F.silu(conv)
            xs, Bt, Ct = xbc[:inner].view(H, P), xbc[inner:inner + N], xbc[inner + N:]
            dt = F.softplus(dt_raw + p["dt_bias"])
            for head in range(H):
                h[head] = torch.exp(dt[head] * A[head]) * h[head] + dt[head] * torch.outer(xs[head], Bt)
            y = h @ Ct + p["D"][:, None] * xs  # [H, P]
            g = y.reshape(inner) * F.silu(z)
            g = g * torch.rsqrt(g.pow(2).mean() + module.norm.eps) * p["norm.weight"]
            out[b, t] = p["out_proj.weight"] @ g
        ssm_out.append(h)
        tail = history[len(history) - (K - 1):] if K > 1 else []
        conv_out.append(torch.stack(tail) if tail else torch.zeros(0, conv_dim, dtype=torch.float64))
    return out, Mamba2State(torch.stack(ssm_out), torch.stack(conv_out))
