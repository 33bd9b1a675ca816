"""The memory module's wiring against a per-head float64 reference written from the spec
(1.1-1.4): projections, causal depthwise conv, SiLU, RMSNorm + per-head L2 norm of q and k,
token-wise eta, chunk-wise beta, the chunked read/normalise/clip/momentum/write loop by
autograd, the per-head output norm, the gate and the output projection.

Nothing of the module is reused except its parameters: every step is a loop over rows,
heads and tokens, so a misplaced transpose, a norm over the wrong axis, a beta averaged
over the wrong tokens or a conv tap in the wrong order shows up here."""

import pytest
import torch
import torch.nn.functional as F

from allmem.config import AllMemConfig
from allmem.memory import AllMemMemory

HIDDEN, HEADS, HEAD_DIM = 12, 2, 4


def _rms(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean() + eps) * weight


def _fast(z, w1, w2, w3, residual):
    out = w2 @ (F.silu(w1 @ z) * (w3 @ z))
    return z + out if residual else out


def reference_memory(mem: AllMemMemory, x: torch.Tensor, cfg: AllMemConfig) -> torch.Tensor:
    """Mem(x) for one row x [T, d] of real tokens, by the spec's equations."""
    p = {n: t.detach().double() for n, t in mem.named_parameters()}
    length, width, kernel = x.shape[0], HEADS * HEAD_DIM, mem.conv_kernel
    projected = torch.cat([x @ p["q_proj.weight"].T, x @ p["k_proj.weight"].T, x @ p["v_proj.weight"].T], -1)
    conv = torch.zeros_like(projected)
    for t in range(length):
        for tap in range(kernel):  # tap kernel-1 multiplies the current token
            src = t - (kernel - 1) + tap
            if src >= 0:
                conv[t] += p["conv_weight"][:, tap] * projected[src]
    q, k, v = F.silu(conv).split(width, dim=-1)
    out = torch.zeros(length, width, dtype=torch.float64)
    for h in range(HEADS):
        cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        w = [p["w1_init"][h].clone(), p["w2_init"][h].clone(), p["w3_init"][h].clone()]
        ref_norms = [wi.norm(dim=-1, keepdim=True) for wi in w]
        momentum = [torch.zeros_like(wi) for wi in w]
        qs, ks, vs, etas = [], [], [], []
        for t in range(length):
            qt = _rms(q[t], p["q_norm.weight"])[cols]
            kt = _rms(k[t], p["k_norm.weight"])[cols]
            qs.append(qt / qt.norm() * cfg.qk_scale)
            ks.append(kt / kt.norm() * cfg.qk_scale)
            vs.append(v[t, cols])
            etas.append(F.softplus(x[t] @ p["eta_proj.weight"][h] + p["eta_proj.bias"][h]))
        for start in range(0, length, cfg.chunk):
            tokens = range(start, min(start + cfg.chunk, length))
            for t in tokens:  # read with the weights written by earlier chunks only
                out[t, cols] = _fast(qs[t], *w, cfg.read_residual)
            if len(tokens) < cfg.chunk:
                break  # a partial chunk is read, not written
            normed = [(wi / (wi.norm(dim=-1, keepdim=True) + cfg.norm_eps) * n).requires_grad_()
                      for wi, n in zip(w, ref_norms)]
            loss = 0.0
            for t in tokens:
                pred = _fast(ks[t], *normed, cfg.read_residual)
                per_token = 0.5 * ((pred - vs[t]) ** 2).sum() if cfg.inner_loss == "mse" else -(pred * vs[t]).sum()
                loss = loss + etas[t] * per_token
            grads = torch.autograd.grad(loss, normed)
            beta = torch.sigmoid(x[list(tokens)].mean(0) @ p["beta_proj.weight"][h] + p["beta_proj.bias"][h])
            for i, g in enumerate(grads):
                if cfg.clip is not None:
                    g = g * min(1.0, cfg.clip / g.norm().item())
                momentum[i] = beta * momentum[i] + g
                w[i] = normed[i].detach() - momentum[i]
    for t in range(length):
        for h in range(HEADS):
            cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            out[t, cols] = _rms(out[t, cols], p["out_norm.weight"][cols], eps=1e-6)
    gated = out * torch.sigmoid(x @ p["gate_proj.weight"].T)
    return gated @ p["o_proj.weight"].T


def _randomised_memory(cfg: AllMemConfig, seed: int) -> AllMemMemory:
    torch.manual_seed(seed)
    mem = AllMemMemory(HIDDEN, HEADS, HEAD_DIM, cfg).double()
    with torch.no_grad():  # no parameter at its neutral init: every wiring choice matters
        for name, param in mem.named_parameters():
            if "init" not in name:
                param.add_(torch.randn_like(param) * (0.5 if "proj" in name else 0.3))
    return mem


@pytest.mark.parametrize("loss,residual,qk_scale,expansion,clip", [
    ("mse", True, 1.0, 1, 1.0),
    ("mse", False, 2.0, 2, 0.05),
    ("dot", True, 1.0, 2, None),
    ("dot", False, 2.0, 1, 0.3),
])
def test_memory_module_matches_the_per_head_reference(loss, residual, qk_scale, expansion, clip):
    cfg = AllMemConfig(window=8, sinks=0, chunk=3, inner_loss=loss, read_residual=residual, qk_scale=qk_scale,
                       expansion=expansion, clip=clip, base_lr=0.4, momentum_init=0.6)
    mem = _randomised_memory(cfg, seed=len(loss) + expansion)
    lengths = torch.tensor([11, 7])  # aligned layout: real tokens first, padding after
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    out, state = mem(x, lengths, None, cfg, keep_state=True)
    for row, n in enumerate(lengths.tolist()):
        expected = reference_memory(mem, x[row, :n], cfg)
        torch.testing.assert_close(out[row, :n], expected, rtol=1e-9, atol=1e-10)
    assert state.fill.tolist() == [11 % 3, 7 % 3]

    # token by token through the constant-size state (the decode path) equals it too
    state, decoded = None, []
    for t in range(7):
        o, state = mem(x[:, t:t + 1], torch.ones(2, dtype=torch.long), state, cfg, keep_state=True)
        decoded.append(o)
    torch.testing.assert_close(torch.cat(decoded, 1)[1], reference_memory(mem, x[1, :7], cfg), rtol=1e-9, atol=1e-10)
