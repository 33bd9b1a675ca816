"""Mamba-2 (SSD) as the memory of the hybrid: the paper's baseline, y = SWA(x) + alpha * Mamba2(x).

A pure-PyTorch Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"), n_groups = 1:

    in_proj: d -> [z (H*P) | x (H*P) | B (N) | C (N) | dt (H)]
    xBC     = silu(causal depthwise conv1d(xBC))           (kernel K, bias, state = last K-1 inputs)
    dt      = softplus(dt + dt_bias),  A = -exp(A_log)     (one scalar per head)
    h_t     = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T         (state h [H, P, N] per sequence)
    y_t     = h_t C_t + D x_t
    out     = out_proj(RMSNorm(y * silu(z)))              (gated RMSNorm, norm after the gate)

Prefill runs the chunked SSD scan (``allmem.ops.ssd.chunk_ssd``), decode the recurrence one
token at a time (``ssd_step``). Both start from and return the state, so any split of a
stream into segments gives the same result.

It follows the conventions of ``allmem.memory.AllMemMemory``: rows are *aligned* (each
row's ``seq_lens[b]`` real tokens first, padding after), ``forward(x, seq_lens, state,
config, keep_state) -> (out, state)``. Padding positions get dt = 0 (no decay, no input)
and are not taken into the conv state, so they never change the state. Unlike the TTT
memory nothing is buffered: the state is exact after every token, and ``config.chunk`` only
sets the block size of the prefill scan.

Size: ``mamba2_dims_for_budget`` picks (heads, state size) for a fixed head width so that
the parameter count matches the TTT memory's for the same base model and config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AllMemConfig
from ..memory import AllMemMemory
from ..ops.ssd import chunk_ssd, ssd_step

DEFAULT_STATE_SIZES = (128, 64, 32, 16)


# --------------------------------------------------------------------------- state
@dataclass
class Mamba2State:
    """Constant-size recurrent state of one Mamba-2 memory layer (batch B).

    ssm: [B, H, P, N], kept in float32 (float64 for float64 models) whatever the model dtype.
    conv: the last kernel-1 real xBC inputs of the conv, [B, kernel-1, H*P + 2N].
    """

    ssm: torch.Tensor
    conv: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Mamba2State":
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Mamba2State":
        """Apply ``fn`` to every tensor (e.g. batch reordering), keeping the structure."""
        return Mamba2State.from_tensors({k: fn(v) for k, v in self.tensors().items()})


# -------------------------------------------------------------------------- sizing
@dataclass(frozen=True)
class Mamba2Dims:
    heads: int
    head_dim: int
    state_size: int
    conv_kernel: int = 4

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.state_size


def mamba2_param_count(hidden: int, dims: Mamba2Dims) -> int:
    """Parameters of ``Mamba2Memory(hidden, dims)``:
    in_proj d(2HP + 2N + H) + conv (HP + 2N)(K + 1) + dt_bias, A_log, D 3H + norm HP + out_proj HP d."""
    h, inner, n, k = dims.heads, dims.inner, dims.state_size, dims.conv_kernel
    return hidden * (2 * inner + 2 * n + h) + (inner + 2 * n) * (k + 1) + 3 * h + inner + inner * hidden


def ttt_memory_param_count(hidden: int, heads: int, head_dim: int, config: AllMemConfig) -> int:
    """Parameters of the AllMem (TTT) memory for these sizes, counted on a meta-device instance
    (so it follows whatever ``AllMemMemory`` holds)."""
    with torch.device("meta"):
        memory = AllMemMemory(hidden, heads, head_dim, config)
    return sum(p.numel() for p in memory.parameters())


def mamba2_dims_for_budget(
    hidden: int,
    target_params: int,
    *,
    head_dim: int = 64,
    conv_kernel: int = 4,
    state_sizes: tuple[int, ...] = DEFAULT_STATE_SIZES,
    heads: int | None = None,
    tolerance: float = 0.02,
) -> Mamba2Dims:
    """Heads H and state size N of a Mamba-2 mixer of about ``target_params`` parameters.

    The head width P is fixed (Mamba-2 uses 64; we take the base model's head_dim). The count
    is linear in H for each N: count = H (3dP + d + P(K+2) + 3) + 2N (d + K + 1), so for every
    candidate N the best integer H >= 1 is the floor or ceiling of the solution (or ``heads``
    if given). Among the candidates within ``tolerance`` (relative) of the target the largest
    state wins (Mamba-2's default is N = 128); if none is that close, the closest count wins.
    """
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")
    per_head = 3 * hidden * head_dim + hidden + head_dim * (conv_kernel + 2) + 3
    candidates = []
    for n in state_sizes:
        if heads is not None:
            options = [heads]
        else:
            exact = (target_params - 2 * n * (hidden + conv_kernel + 1)) / per_head
            options = sorted({max(1, math.floor(exact)), max(1, math.ceil(exact))})
        for h in options:
            dims = Mamba2Dims(h, head_dim, n, conv_kernel)
            error = abs(mamba2_param_count(hidden, dims) - target_params) / target_params
            candidates.append((error, dims))
    close = [c for c in candidates if c[0] <= tolerance]
    if close:
        return max(close, key=lambda c: (c[1].state_size, -c[0]))[1]
    return min(candidates, key=lambda c: c[0])[1]


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight (Mamba-2's RMSNormGated, norm after the gate, one group),
    computed in float32 or wider."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(y.dtype, torch.float32)
        g = y.to(wide) * F.silu(z.to(wide))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g * self.weight.to(wide)).to(y.dtype)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


# -------------------------------------------------------------------------- module
class Mamba2Memory(nn.Module):
    """The Mamba-2 mixer used as the hybrid's memory (the paper's baseline)."""

    def __init__(self, hidden_size: int, dims: Mamba2Dims, *, dt_min: float = 1e-3, dt_max: float = 0.1,
                 A_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = 1e-5):
        super().__init__()
        self.dims = dims
        self.heads, self.head_dim, self.state_size = dims.heads, dims.head_dim, dims.state_size
        self.inner, self.conv_dim = dims.inner, dims.conv_dim
        self.conv_kernel = max(dims.conv_kernel, 1)
        self.in_proj = nn.Linear(hidden_size, 2 * self.inner + 2 * self.state_size + self.heads, bias=False)
        # depthwise causal conv over [x | B | C], nn.Conv1d's default init (as in mamba_ssm)
        bound = 1 / math.sqrt(self.conv_kernel)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim).uniform_(-bound, bound))
        # Mamba-2's initialisation: dt log-uniform in [dt_min, dt_max], A uniform in A_range, D = 1
        dt = torch.exp(torch.rand(self.heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(_inverse_softplus(dt.clamp(min=1e-4)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(*A_range)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.inner, eps=norm_eps)
        self.out_proj = nn.Linear(self.inner, hidden_size, bias=False)

    @classmethod
    def for_config(cls, hidden_size: int, kv_heads: int, head_dim: int, config: AllMemConfig) -> "Mamba2Memory":
        """Sized like ``AllMemAttention`` would size the TTT memory for this layer: heads and
        state size from the config when both are given, else matched to the TTT memory's
        parameter count (``mamba2_dims_for_budget``)."""
        p = config.mamba_head_dim or head_dim
        kernel = max(config.conv_kernel, 1)
        if config.mamba_heads is not None and config.mamba_state is not None:
            dims = Mamba2Dims(config.mamba_heads, p, config.mamba_state, kernel)
        else:
            target = ttt_memory_param_count(
                hidden_size, config.memory_heads or kv_heads, config.memory_head_dim or head_dim, config
            )
            states = (config.mamba_state,) if config.mamba_state is not None else DEFAULT_STATE_SIZES
            dims = mamba2_dims_for_budget(hidden_size, target, head_dim=p, conv_kernel=kernel,
                                          state_sizes=states, heads=config.mamba_heads)
        return cls(hidden_size, dims)

    # ----------------------------------------------------------------- state
    @staticmethod
    def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(dtype, torch.float32)

    def empty_state(self, batch: int, chunk: int | None = None, device=None, dtype=None) -> Mamba2State:
        """Zero state (``chunk`` is accepted for symmetry with the TTT memory and unused)."""
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(
            ssm=torch.zeros(batch, self.heads, self.head_dim, self.state_size, device=device,
                            dtype=self._scan_dtype(dtype)),
            conv=torch.zeros(batch, self.conv_kernel - 1, self.conv_dim, device=device, dtype=dtype),
        )

    # --------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        seq_lens: torch.Tensor,
        state: Mamba2State | None,
        config: AllMemConfig,
        keep_state: bool,
    ) -> tuple[torch.Tensor, Mamba2State | None]:
        """x [B, T, d] aligned (real tokens first), seq_lens [B] -> (Mamba2(x) [B, T, d], state)."""
        batch, length, _ = x.shape
        valid = torch.arange(length, device=x.device)[None] < seq_lens[:, None]  # [B, T]
        x = x * valid.unsqueeze(-1).to(x.dtype)
        fresh = state is None
        conv_state = self.empty_state(batch, None, x.device, x.dtype).conv if fresh else state.conv

        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc, new_conv = self._conv(xbc, conv_state, seq_lens)
        xs, B, C = F.silu(xbc).split([self.inner, self.state_size, self.state_size], dim=-1)

        scan = self._scan_dtype(x.dtype)
        dt = F.softplus(dt.to(scan) + self.dt_bias.to(scan)) * valid.unsqueeze(-1)  # [B, T, H]
        A = -torch.exp(self.A_log.to(scan))
        xs = xs.to(scan).view(batch, length, self.heads, self.head_dim)
        B, C = B.to(scan), C.to(scan)
        ssm0 = None if fresh else state.ssm.to(scan)
        if length == 1 and not fresh:
            y, ssm = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm0)
            y = y.unsqueeze(1)
        else:
            y, ssm = chunk_ssd(xs, dt, A, B, C, ssm0, chunk_size=config.chunk)
        y = y + xs * self.D.to(scan)[:, None]
        y = self.norm(y.reshape(batch, length, self.inner), z).to(x.dtype)
        out = self.out_proj(y)
        return out, (Mamba2State(ssm, new_conv) if keep_state else None)

    def _conv(self, inputs: torch.Tensor, conv_state: torch.Tensor, seq_lens: torch.Tensor):
        """Causal depthwise conv (with bias) continuing from ``conv_state``; the new state is the
        last kernel-1 *real* inputs of every row."""
        kernel = self.conv_kernel
        weight, bias = self.conv_weight.to(inputs.dtype), self.conv_bias.to(inputs.dtype)
        if kernel == 1:
            return inputs * weight[:, 0] + bias, conv_state
        full = torch.cat([conv_state.to(inputs.dtype), inputs], dim=1)  # [B, K-1+T, ch]
        out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), bias, groups=full.shape[-1])
        idx = seq_lens[:, None] + torch.arange(kernel - 1, device=inputs.device)[None]  # [B, K-1]
        new_state = full.gather(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        return out.transpose(1, 2), new_state
