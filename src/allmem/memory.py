"""The AllMem memory module (spec 1.1-1.4): projections, short conv, norms, eta/beta heads,
the chunked test-time-trained SwiGLU memory, output norm, gate and projection.

Works on the *aligned* layout every layer of the converted model uses: in each row the
segment's real tokens come first (``seq_lens`` of them) and padding follows, so chunk
boundaries count from each sequence's first real token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import AllMemConfig
from .ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms, swiglu_read, ttt_update
from .ops.ttt import set_compiled as set_chunk_compiled  # memory.set_compiled covers both


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, or over each of ``groups`` equal slices of it (per head)."""

    def __init__(self, width: int, groups: int = 1, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.groups, self.eps = groups, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least float32 (a bf16 mean of squares loses digits), float64 when the input is
        shape, wide = x.shape, torch.promote_types(x.dtype, torch.float32)
        xw = x.to(wide).view(*shape[:-1], self.groups, shape[-1] // self.groups)
        xw = F.rms_norm(xw, (xw.shape[-1],), eps=self.eps)  # one kernel, not five small ops
        return (xw.view(shape) * self.weight.to(wide)).to(x.dtype)


@dataclass
class MemoryState:
    """Constant-size recurrent state of one memory layer (batch B, heads H, chunk C); an
    ``allmem.memories.RecurrentState``, as ``AllMemMemory`` is a ``Memory``.

    weights/momentum: fast weights and momentum, [B, H, ., .] per matrix.
    buffer_*: the partial chunk not yet written: keys/values [B, H, C, d_h], eta and the
    bias-free beta logits [B, H, C]; ``fill`` [B] says how many slots are used.
    conv: the last kernel-1 projected inputs [B, kernel-1, 3 * H * d_h].
    """

    weights: FastWeights
    momentum: FastWeights
    buffer_k: torch.Tensor
    buffer_v: torch.Tensor
    buffer_eta: torch.Tensor
    buffer_beta: torch.Tensor
    fill: torch.Tensor
    conv: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                out.update({f"{f.name}.{i}": t for i, t in enumerate(value)})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "MemoryState":
        def triple(name):
            return FastWeights(*(tensors[f"{name}.{i}"] for i in range(3)))

        plain = {f.name: tensors[f.name] for f in fields(cls) if f.name not in ("weights", "momentum")}
        return cls(weights=triple("weights"), momentum=triple("momentum"), **plain)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "MemoryState":
        """Apply ``fn`` to every tensor (e.g. batch reordering), keeping the structure."""
        return MemoryState.from_tensors({k: fn(v) for k, v in self.tensors().items()})


def _write_slot(buffer: torch.Tensor, new: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """buffer [B, H, C, ...] with new [B, H, 1, ...] written at time slot[b] of every row."""
    index = slot.view(-1, 1, 1).expand(buffer.shape[0], buffer.shape[1], 1)
    if buffer.dim() == 4:
        index = index.unsqueeze(-1).expand(-1, -1, -1, buffer.shape[-1])
    return scatter_state(buffer, 2, index, new)


def scatter_state(state: torch.Tensor, dim: int, index: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``state.scatter(dim, index, new)``; in place when autograd is off (inference: the
    cache owns its tensors, so a one-token write costs O(1) instead of a copy of the state)."""
    new = new.to(state.dtype)
    return state.scatter(dim, index, new) if torch.is_grad_enabled() else state.scatter_(dim, index, new)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the fast weights, momentum and buffered chunk: at least float32. In bf16
    a write of eta * G (~1e-3 of a weight) rounds away or lands with a 1e-2 relative error,
    and that error accumulates over every chunk, so the logits drift with position."""
    return torch.promote_types(dtype, torch.float32)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class AllMemMemory(nn.Module):
    def __init__(self, hidden_size: int, heads: int, head_dim: int, config: AllMemConfig):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.width = width
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, width, bias=False)
        self.conv_kernel = max(config.conv_kernel, 1)
        # depthwise causal conv over [q | k | v]; starts as the identity (last tap = 1) so an
        # attention-initialised memory reads the attention's own queries and values at first;
        # with key_shift the keys start one token back (see AllMemConfig.conv_init)
        conv = torch.zeros(3 * width, self.conv_kernel)
        conv[:, -1] = 1.0
        if config.conv_init == "key_shift" and self.conv_kernel >= 2:
            conv[width : 2 * width, -1] = 0.0
            conv[width : 2 * width, -2] = 1.0
        self.conv_weight = nn.Parameter(conv)
        # (ours, AllMemConfig.centre) the features' mean, subtracted before the norms; set by calibrate_centre
        self.feature_mean = nn.Parameter(torch.zeros(3 * width)) if config.centre else None
        self.q_norm = RMSNorm(width)
        self.k_norm = RMSNorm(width)
        self.eta_proj = nn.Linear(hidden_size, heads)
        self.beta_proj = nn.Linear(hidden_size, heads)
        feat = config.expansion * head_dim
        self.w1_init = nn.Parameter(torch.randn(heads, feat, head_dim) / math.sqrt(head_dim))
        self.w2_init = nn.Parameter(torch.randn(heads, head_dim, feat) / math.sqrt(feat) * 0.1)
        self.w3_init = nn.Parameter(torch.randn(heads, feat, head_dim) / math.sqrt(head_dim))
        self.out_norm = RMSNorm(width, groups=heads)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)
        self.reset_control_heads(config)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.o_proj):
            nn.init.normal_(proj.weight, std=0.02)

    def reset_control_heads(self, config: AllMemConfig) -> None:
        """eta starts at base_lr and beta at momentum_init for every token (zero weights)."""
        with torch.no_grad():
            self.eta_proj.weight.zero_()
            self.eta_proj.bias.fill_(_inverse_softplus(config.base_lr))
            self.beta_proj.weight.zero_()
            self.beta_proj.bias.fill_(math.log(config.momentum_init / (1 - config.momentum_init)))

    # ----------------------------------------------------------------- state
    def initial_weights(self) -> FastWeights:
        return FastWeights(self.w1_init, self.w2_init, self.w3_init)

    def empty_state(self, batch: int, chunk: int, device=None, dtype=None) -> MemoryState:
        """A fresh state for ``batch`` rows; ``dtype`` is the activation dtype (the conv inputs);
        weights, momentum and the chunk buffer are kept in ``state_dtype(dtype)``."""
        w0 = self.initial_weights()
        dtype = dtype or self.w1_init.dtype
        wide = state_dtype(dtype)
        device = device or self.w1_init.device
        weights = FastWeights(*(w.detach().to(wide).unsqueeze(0).repeat(batch, 1, 1, 1) for w in w0))
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=wide)  # noqa: E731
        return MemoryState(
            weights=weights,
            momentum=FastWeights(*(torch.zeros_like(w) for w in weights)),
            buffer_k=zeros(batch, self.heads, chunk, self.head_dim),
            buffer_v=zeros(batch, self.heads, chunk, self.head_dim),
            buffer_eta=zeros(batch, self.heads, chunk),
            buffer_beta=zeros(batch, self.heads, chunk),
            fill=torch.zeros(batch, dtype=torch.long, device=device),
            conv=torch.zeros(batch, self.conv_kernel - 1, 3 * self.width, device=device, dtype=dtype),
        )

    # --------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        seq_lens: torch.Tensor,
        state: MemoryState | None,
        config: AllMemConfig,
        keep_state: bool,
    ) -> tuple[torch.Tensor, MemoryState | None]:
        """x [B, T, d] aligned (real tokens first), seq_lens [B] -> (Mem(x) [B, T, d], state)."""
        batch, length, _ = x.shape
        chunk = config.chunk
        fresh = state is None
        decode = length == 1 and not fresh and bool((seq_lens == 1).all())
        valid = None  # decode: every row's one token is real
        if not decode:
            valid = (torch.arange(length, device=x.device)[None] < seq_lens[:, None]).unsqueeze(-1)  # [B, T, 1]
            x = x * valid.to(x.dtype)
        if fresh:
            # training/one-shot prefill: read the learned initial weights in-graph
            state = self.empty_state(batch, chunk, x.device, x.dtype)
            state.weights = FastWeights(*(w.to(state_dtype(x.dtype)).unsqueeze(0).expand(batch, -1, -1, -1)
                                          for w in self.initial_weights()))
        elif state.buffer_k.shape[2] != chunk:
            raise ValueError(
                f"the cache was built with chunk {state.buffer_k.shape[2]} but the model now uses chunk {chunk}; "
                "start a new cache after changing the chunk size"
            )

        if decode:
            o, k, v, eta, beta_logits, conv_state = _DECODE_READ["fn"](self, x, state.conv, state.weights, config)
            new_state = self.decode_write(k, v, eta, beta_logits, state, config)
            new_state.conv = conv_state
            return o, new_state

        q, k, v, eta, beta_logits, conv_state = self._project(x, valid, state.conv, seq_lens, config)
        # the read/write op runs in the state's dtype (float32 for bf16/fp16 activations), with
        # autocast off so that its matmuls are not cast back down; the read returns to x.dtype
        with torch.autocast(x.device.type, enabled=False):
            norms = self._reference_norms(batch, q.dtype, config)
            o, new_state = self._segment(q, k, v, eta, beta_logits, state, norms, seq_lens, config, keep_state)
        if new_state is not None:
            new_state.conv = conv_state
        return self._output(o, x), new_state

    def _project(self, x, valid, conv_state, seq_lens, config: AllMemConfig):
        """x [B, T, d] -> q, k, v [B, H, T, d_h], eta and bias-free beta logits [B, H, T], all in
        ``state_dtype(x.dtype)``, and the conv state after x. ``valid`` [B, T, 1] masks padding
        (None: every row has one real token, the decode step)."""
        qkv = self._qkv(x)  # [B, T, 3 Hd]
        qkv, conv_state = self._conv(qkv, conv_state, seq_lens, one_each=valid is None)
        q, k, v = self._features(qkv).split(self.width, dim=-1)
        q = self._heads(F.normalize(self._split(self.q_norm(q)), dim=-1))  # [B, H, T, d_h]
        k = self._heads(F.normalize(self._split(self.k_norm(k)), dim=-1))
        if config.qk_scale != 1.0:
            q, k = q * config.qk_scale, k * config.qk_scale
        v = self._heads(self._split(v))
        eta = F.softplus(self.eta_proj(x))
        eta = (eta if valid is None else eta * valid).transpose(1, 2)  # [B, H, T]
        beta_logits = F.linear(x, self.beta_proj.weight).transpose(1, 2)  # [B, H, T], bias-free
        wide = state_dtype(x.dtype)
        return (*(t.to(wide) for t in (q, k, v, eta, beta_logits)), conv_state)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The read o [B, H, T, d_h] -> the memory's output [B, T, d]: per-head norm, gate, projection."""
        batch, length = x.shape[:2]
        o = o.to(x.dtype).transpose(1, 2).reshape(batch, length, self.width)
        o = self.out_norm(o) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(o)

    def _features(self, qkv: torch.Tensor) -> torch.Tensor:
        """silu of the conv output [B, T, 3 H d_h], centred when the memory has a feature mean."""
        features = F.silu(qkv)
        return features if self.feature_mean is None else features - self.feature_mean.to(features.dtype)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], self.heads, self.head_dim)

    @staticmethod
    def _heads(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2)  # [B, T, H, d] -> [B, H, T, d]

    def _reference_norms(self, batch: int, dtype: torch.dtype, config: AllMemConfig) -> FastWeights | None:
        # n0 of the learned initial weights, shared by every sequence of the batch
        if not config.weight_norm:
            return None
        return FastWeights(*(n.to(dtype).repeat(batch, 1, 1) for n in row_norms(self.initial_weights())))

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[q | k | v] projections. Without autograd as one matmul against the three weights
        concatenated once (per decode token three small matmuls and a cat cost more than the
        arithmetic); the concatenation is rebuilt whenever a weight changes (its version). The
        output gate and beta heads stay apart: with them in the same matmul (session 10) the result
        depended on the thread count in its last bits, and a chat session resumed in a process
        with another thread count no longer continued exactly."""
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        if grad or torch.compiler.is_compiling():  # compiled: no cache to mutate, the compiler fuses
            return torch.cat([F.linear(x, w) for w in weights], dim=-1)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        cached = getattr(self, "_qkv_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.cat([w.detach() for w in weights], dim=0))
            self._qkv_cache = cached
        return F.linear(x, cached[1].to(x.dtype))

    def _conv(self, inputs: torch.Tensor, conv_state: torch.Tensor, seq_lens: torch.Tensor, one_each: bool = False):
        """Causal depthwise conv continuing from ``conv_state``; the new state is the last
        kernel-1 *real* inputs of every row. ``one_each``: every row has one real token (decode),
        so that is simply the last kernel-1 inputs."""
        kernel = self.conv_kernel
        if kernel == 1:
            return inputs * self.conv_weight[:, 0], conv_state
        full = torch.cat([conv_state.to(inputs.dtype), inputs], dim=1)  # [B, K-1+T, ch]
        if inputs.shape[1] == 1:  # decode: one weighted sum instead of a convolution call
            out = (full * self.conv_weight.mT.to(inputs.dtype)).sum(1, keepdim=True)
        else:
            out = F.conv1d(full.transpose(1, 2), self.conv_weight.unsqueeze(1).to(inputs.dtype),
                           groups=full.shape[-1]).transpose(1, 2)
        if one_each:  # contiguous: the same strides as after a prefill, so one compiled decode graph serves both
            return out, full[:, 1:].contiguous()
        idx = seq_lens[:, None] + torch.arange(kernel - 1, device=inputs.device)[None]  # [B, K-1]
        new_state = full.gather(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        return out, new_state

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])  # [B, H, ...] -> [B*H, ...]

    def _state_flat(self, state: MemoryState, dtype: torch.dtype) -> TTTState:
        # .to(dtype): a cache saved before the state was kept in float32 may hold bf16 weights
        flat = lambda ws: FastWeights(*(self._flat(w).to(dtype) for w in ws))  # noqa: E731
        return TTTState(flat(state.weights), flat(state.momentum))

    def _unflat(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t.view(batch, self.heads, *t.shape[1:])

    def _beta(self, logits_sum: torch.Tensor, count: int) -> torch.Tensor:
        return torch.sigmoid(logits_sum / count + self.beta_proj.bias.view(-1, *([1] * (logits_sum.dim() - 2))))

    def decode_write(self, k, v, eta, beta_logits, state: MemoryState, config) -> MemoryState:
        """Append one token per row to the partial chunk; write the rows whose chunk filled."""
        batch = k.shape[0]
        chunk = config.chunk
        buffer_k, buffer_v = _write_slot(state.buffer_k, k, state.fill), _write_slot(state.buffer_v, v, state.fill)
        buffer_eta = _write_slot(state.buffer_eta, eta, state.fill)
        buffer_beta = _write_slot(state.buffer_beta, beta_logits, state.fill)
        fill = state.fill + 1
        full = fill == chunk
        weights, momentum = state.weights, state.momentum
        if bool(full.any()):
            beta = self._beta(buffer_beta.sum(-1), chunk)  # [B, H]
            with torch.autocast(k.device.type, enabled=False):
                new = ttt_update(
                    self._state_flat(state, k.dtype), *(self._flat(b).to(k.dtype) for b in (buffer_k, buffer_v, buffer_eta)),
                    self._flat(beta), self._reference_norms(batch, k.dtype, config), loss=config.inner_loss,
                    clip=config.clip, eps=config.norm_eps, apply=full.repeat_interleave(self.heads),
                    residual=config.read_residual,
                )
            weights = FastWeights(*(self._unflat(w, batch) for w in new.weights))
            momentum = FastWeights(*(self._unflat(m, batch) for m in new.momentum))
            fill = torch.where(full, torch.zeros_like(fill), fill)
        return MemoryState(weights, momentum, buffer_k, buffer_v, buffer_eta, buffer_beta, fill, state.conv)

    def _segment(self, q, k, v, eta, beta_logits, state: MemoryState, norms, seq_lens, config, keep_state):
        """Many tokens: prepend each row's partial chunk, run the chunked op, re-buffer the tail."""
        batch, heads, length, dim = q.shape
        chunk = config.chunk
        fill = state.fill
        device = q.device
        fresh_buffer = not bool(fill.any())
        total = fill + seq_lens  # tokens of each row in the combined sequence
        comb_len = int(fill.max()) + length
        # combined position i of row b reads buffer slot i (i < fill_b) or new token i - fill_b
        pos = torch.arange(comb_len, device=device)[None]
        src = torch.where(pos < fill[:, None], pos, chunk + pos - fill[:, None]).clamp(max=chunk + length - 1)

        def combine(buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([buffer.to(new.dtype), new], dim=2)
            index = src[:, None, :].expand(batch, heads, comb_len)
            if both.dim() == 4:
                index = index.unsqueeze(-1).expand(-1, -1, -1, both.shape[-1])
            return both.gather(2, index)

        if fresh_buffer:  # nothing buffered: the combined sequence is the segment itself
            q_c, k_c, v_c, eta_c, beta_c = q, k, v, eta, beta_logits
        else:
            q_c = combine(torch.zeros_like(state.buffer_k), q)
            k_c, v_c = combine(state.buffer_k, k), combine(state.buffer_v, v)
            eta_c, beta_c = combine(state.buffer_eta, eta), combine(state.buffer_beta, beta_logits)
        num_chunks = -(-comb_len // chunk)
        padded = num_chunks * chunk
        chunk_sums = F.pad(beta_c, (0, padded - comb_len)).view(batch, heads, num_chunks, chunk).sum(-1)
        beta = self._beta(chunk_sums, chunk)  # [B, H, nc]
        ends = (torch.arange(num_chunks, device=device) + 1) * chunk
        update_mask = (ends[None] <= total[:, None]).repeat_interleave(heads, dim=0)  # [BH, nc]

        o_c, final = chunk_ttt(
            self._flat(q_c), self._flat(k_c), self._flat(v_c), self._flat(eta_c), self._flat(beta),
            self._state_flat(state, q.dtype), norms, chunk_size=chunk, loss=config.inner_loss, clip=config.clip,
            eps=config.norm_eps, update_mask=update_mask, residual=config.read_residual,
        )
        o = self._unflat(o_c, batch)
        if not fresh_buffer:
            out_index = (fill[:, None] + torch.arange(length, device=device)[None]).clamp(max=comb_len - 1)
            o = o.gather(2, out_index[:, None, :, None].expand(-1, heads, -1, dim))
        if not keep_state:
            return o, None

        # the new partial chunk: combined positions [C * full_chunks, total) of every row
        written = (total // chunk) * chunk
        new_fill = total - written
        slots = torch.arange(chunk, device=device)[None]
        take = (written[:, None] + slots).clamp(max=comb_len - 1)  # [B, C]
        live = slots < new_fill[:, None]

        def rebuffer(t: torch.Tensor) -> torch.Tensor:
            index = take[:, None, :].expand(batch, heads, chunk)
            mask = live[:, None, :]
            if t.dim() == 4:
                index = index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
                mask = mask.unsqueeze(-1)
            return t.gather(2, index) * mask

        new_state = MemoryState(
            weights=FastWeights(*(self._unflat(w, batch) for w in final.weights)),
            momentum=FastWeights(*(self._unflat(m, batch) for m in final.momentum)),
            buffer_k=rebuffer(k_c), buffer_v=rebuffer(v_c), buffer_eta=rebuffer(eta_c),
            buffer_beta=rebuffer(beta_c), fill=new_fill, conv=state.conv,
        )
        return o, new_state


def decode_read(memory: AllMemMemory, x: torch.Tensor, conv_state: torch.Tensor, weights: FastWeights,
                config: AllMemConfig):
    """One decode token per row through the memory, without the write: x [B, 1, d] ->
    (output [B, 1, d], k, v [B, H, 1, d_h], eta, beta logits [B, H, 1], conv state). No
    data-dependent branch, so ``torch.compile`` takes it whole (``set_compiled``)."""
    batch = x.shape[0]
    q, k, v, eta, beta_logits, conv_state = memory._project(x, None, conv_state, None, config)
    with torch.autocast(x.device.type, enabled=False):
        flat_weights = FastWeights(*(memory._flat(w).to(q.dtype) for w in weights))
        z = memory._flat(q)
        o = swiglu_read(z, flat_weights)  # [BH, 1, d]
        if not config.read_residual:
            o = o - z
    return memory._output(memory._unflat(o, batch), x), k, v, eta, beta_logits, conv_state


_DECODE_READ = {"fn": decode_read}


def set_compiled(enabled: bool = True) -> None:
    """Run the memory through ``torch.compile``: the decode step's read (projections, conv,
    norms, fast-weight read, gate, output; one graph shared by every layer) and the chunked
    op's per-chunk read and write (``allmem.ops.ttt.set_compiled``). The first call of each
    shape compiles (seconds); results match eager to rounding, not bit for bit. False: eager."""
    set_chunk_compiled(enabled)
    _DECODE_READ["fn"] = torch.compile(decode_read, dynamic=False) if enabled else decode_read
