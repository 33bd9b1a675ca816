"""The AllMem token mixer: the layer's own attention restricted to sinks + a sliding window,
in parallel with the test-time-trained memory, fused as y = SWA(x) + alpha * Mem(x).

It replaces a decoder layer's ``self_attn`` and keeps that module's pretrained, frozen
q/k/v/o projections and q_norm/k_norm. Rotary tables and the per-row bookkeeping arrive in
a ``Segment`` built once per forward by the model; the layer reads and writes its own slot
of the cache through ``LayerState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .config import AllMemConfig
from .memories import RecurrentState, build_memory
from .memory import AllMemMemory, decode_read, scatter_state
from .memory import set_compiled as set_memory_compiled  # layer.set_compiled covers both
from .ops.swa import swa_dense, swa_prefill
from .ops.ttt import FastWeights


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a forward hook would fire on ``module`` or a submodule (their own or global ones,
    such as torch's FLOP counter and profilers register): a fused path that calls the submodules'
    functions rather than the modules must then step aside, so that every hook fires as it would."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] (the Llama/Qwen/Mistral convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


@dataclass
class Segment:
    """What every layer needs to know about the tokens of one forward call.

    Rows are aligned: each row's ``seq_lens[b]`` real tokens come first, padding after.
    seen [B]: tokens each row had already consumed. cos/sin [B, T, D] rotate the queries
    and keys at their true positions; sink_cos/sink_sin rotate queries for their view of the
    sinks (``rolling`` positions); None means the same as cos/sin. A layer with a rotary table
    of its own (Gemma 3: one per layer type) builds its tables once per segment into ``tables``.
    """

    config: AllMemConfig
    seq_lens: torch.Tensor
    seen: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    sink_cos: torch.Tensor | None
    sink_sin: torch.Tensor | None
    states: list | None  # per-layer LayerState (or None before the first write); None = no cache
    tables: dict = field(default_factory=dict)  # layer type -> (cos, sin, sink_cos, sink_sin)
    # window masks of the prefill attention, built by the first layer and found again by the others
    # (every layer's queries and keys sit at the same positions; ops.swa.sdpa checks that they do)
    masks: dict = field(default_factory=dict)
    # one real token in every row, each row past its sinks: the common decode step, which every layer
    # then takes on one branch-free path (decode_window); decided once per forward, not per layer
    steady_decode: bool = False


@dataclass
class WindowState:
    """Sinks and the ring buffer of the last W keys/values (post-norm, post-RoPE), with the
    absolute position held by each slot (-1 = empty). A key at position p sits in slot p % W."""

    sink_k: torch.Tensor  # [B, Hkv, S, D]
    sink_v: torch.Tensor
    sink_pos: torch.Tensor  # [B, S]
    ring_k: torch.Tensor  # [B, Hkv, W, D]
    ring_v: torch.Tensor
    ring_pos: torch.Tensor  # [B, W]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LayerState:
    window: WindowState
    memory: RecurrentState  # the memory module's own state (allmem.memories)


def _gather_time(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, H, L, D], index [B, K] -> [B, H, K, D]."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


class AllMemAttention(nn.Module):
    def __init__(self, attention: nn.Module, hidden_size: int, num_kv_heads: int, config: AllMemConfig):
        super().__init__()
        self.attn = attention  # the pretrained module: projections, q_norm/k_norm, scaling
        self.head_dim = attention.head_dim
        self.num_kv_heads = num_kv_heads
        self.layer_idx = attention.layer_idx
        self.memory = build_memory(hidden_size, num_kv_heads, self.head_dim, config)  # by config.memory_type
        self.alpha = nn.Parameter(torch.zeros(hidden_size))
        # set by convert() for families whose layers differ (Gemma 3): a pretrained sliding-window
        # layer keeps its own window (capped by the configured one) and attends no sinks, and a
        # layer type with its own rotary table (rope theta) rotates with it
        self.native_window: int | None = None
        self.layer_type: str | None = None
        self._rotary: nn.Module | None = None

    def use_layer_type(self, rotary: nn.Module, layer_type: str, native_window: int | None) -> None:
        """Rotate with ``rotary(x, positions, layer_type)`` instead of the Segment's tables; a
        ``native_window`` makes this layer the pretrained sliding-window attention it was."""
        object.__setattr__(self, "_rotary", rotary)  # shared by every layer; not a submodule of each
        self.layer_type, self.native_window = layer_type, native_window

    def _rotary_tables(self, x: torch.Tensor, seg: Segment):
        if self._rotary is None:
            return seg.cos, seg.sin, seg.sink_cos, seg.sink_sin
        tables = seg.tables.get(self.layer_type)
        if tables is None:
            positions = seg.seen[:, None] + torch.arange(x.shape[1], device=x.device)[None]
            cos, sin = self._rotary(x, positions, self.layer_type)
            sink_cos = sink_sin = None
            if seg.sink_cos is not None:  # rolling positions: the sinks' view, as the model computes it
                cfg = seg.config
                sink_cos, sink_sin = self._rotary(x, positions.clamp(max=cfg.sinks + cfg.window - 1), self.layer_type)
            tables = seg.tables[self.layer_type] = (cos, sin, sink_cos, sink_sin)
        return tables

    def forward(self, hidden_states: torch.Tensor, allmem_segment: Segment | None = None, **_unused):
        if allmem_segment is None:
            raise RuntimeError(
                "AllMemAttention was called without a Segment: run the converted model through "
                "AllMemForCausalLM (allmem.convert) rather than the original model's forward"
            )
        seg = allmem_segment
        state = None if seg.states is None else seg.states[self.layer_idx]
        if seg.steady_decode and self.fuses_steady_decode():
            return self.steady_decode(_DECODE_MIXER["fn"], self, hidden_states, seg), None
        keep_state = seg.states is not None
        attn_out, window_state = self._window_attention(hidden_states, seg, state)
        # the memory runs in its parameters' dtype: convert() keeps them float32 on a bf16 base
        # (master weights a step of lr 5e-4 can move), so bf16 activations go up and come back down
        mem_dtype = torch.promote_types(hidden_states.dtype, self.alpha.dtype)
        mem_out, memory_state = self.memory(
            hidden_states.to(mem_dtype), seg.seq_lens, None if state is None else state.memory, seg.config, keep_state
        )
        if keep_state:
            seg.states[self.layer_idx] = LayerState(window_state, memory_state)
        return mix(attn_out, self.alpha, mem_out), None

    # ------------------------------------------------------- steady decode
    def fuses_steady_decode(self) -> bool:
        """A steady decode token goes through ``decode_mixer`` (window attention, memory read and
        their mix as one function, one compiled graph) when the memory is AllMem's own and no
        forward hook waits on it (the fused path does not call the memory as a module)."""
        return isinstance(self.memory, AllMemMemory) and not has_forward_hooks(self.memory)

    def steady_decode(self, step, owner: nn.Module, x: torch.Tensor, seg: Segment) -> torch.Tensor:
        """One steady decode token through ``step`` (``decode_mixer`` with this module as ``owner``, or
        ``allmem.modeling.decode_block`` with its decoder layer), given this layer's window and memory
        state (a steady decode has a cache; this layer wrote it before); then, outside the step, the
        memory buffers the token (and writes the chunk it fills: a data-dependent step) and this
        layer's new state is stored. x [B, 1, d] -> the step's output [B, 1, d]."""
        state = seg.states[self.layer_idx]
        ws, ms = state.window, state.memory
        out, ring_k, ring_v, ring_pos, k, v, eta, beta_logits, conv = step(
            owner, x, *self._rotary_tables(x, seg), seg.seen, ws.ring_k, ws.ring_v, ws.ring_pos, ws.sink_k, ws.sink_v,
            ws.sink_pos, ms.conv, *ms.weights, span=self._span(seg.config), attend_sinks=self.native_window is None,
            config=seg.config)
        memory_state = self.memory.decode_write(k, v, eta, beta_logits, ms, seg.config)
        memory_state.conv = conv
        seg.states[self.layer_idx] = LayerState(WindowState(ws.sink_k, ws.sink_v, ws.sink_pos, ring_k, ring_v, ring_pos),
                                                memory_state)
        return out

    def teacher_attention(self, hidden_states: torch.Tensor, seg: Segment) -> torch.Tensor:
        """What the pretrained attention returns on these inputs: every earlier token of the segment,
        no sinks (a pretrained sliding-window layer keeps its own window). hidden_states [B, T, d]
        -> [B, T, d]. For a segment that starts its sequences (training); the target of the
        attention-transfer loss, against which this layer's output (window + alpha * memory) is fit."""
        if bool(seg.seen.any()):
            raise ValueError("teacher_attention needs a segment that starts its sequences (seen = 0)")
        batch, length, _ = hidden_states.shape
        span = length if self.native_window is None else self.native_window
        q, k, v = self._project(hidden_states)
        cos, sin, _, _ = self._rotary_tables(hidden_states, seg)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = q.shape[1] // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, groups, length, self.head_dim)
        positions = torch.arange(length, device=hidden_states.device)[None].expand(batch, -1)
        out = swa_prefill(q, k, v, positions, positions, window=span, scale=self.attn.scaling,
                          block=seg.config.swa_block)
        return self.attn.o_proj(out.reshape(batch, -1, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1))

    # ---------------------------------------------------------------- window
    def _project(self, x: torch.Tensor):
        attn = self.attn
        batch, length, _ = x.shape
        shape = (batch, length, -1, self.head_dim)
        q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

    def _sinks(self, k: torch.Tensor, v: torch.Tensor, seg: Segment, window_state: WindowState | None,
               total: torch.Tensor):
        """Sink keys, values and positions: positions < S, from the cache when already seen,
        else from this segment (-1 where a row has not reached that position)."""
        sinks, length = seg.config.sinks, k.shape[2]
        s_idx = torch.arange(sinks, device=k.device)[None]
        from_new = sinks + (s_idx - seg.seen[:, None])
        src = torch.where(s_idx < seg.seen[:, None], s_idx, from_new).clamp(0, sinks + min(sinks, length) - 1)
        if window_state is None:
            empty = k.new_zeros(k.shape[0], self.num_kv_heads, sinks, self.head_dim)
            old_sink_k, old_sink_v = empty, empty
        else:
            old_sink_k, old_sink_v = window_state.sink_k, window_state.sink_v
        sink_k = _gather_time(torch.cat([old_sink_k, k[:, :, :sinks]], dim=2), src)
        sink_v = _gather_time(torch.cat([old_sink_v, v[:, :, :sinks]], dim=2), src)
        sink_pos = torch.where(s_idx < total[:, None], s_idx, torch.full_like(s_idx, -1))
        return sink_k, sink_v, sink_pos

    def _window_attention(self, x: torch.Tensor, seg: Segment, state: LayerState | None):
        if seg.steady_decode and state is not None:  # steady_decode implies a cache
            ws = state.window
            cos, sin, sink_cos, sink_sin = self._rotary_tables(x, seg)
            attn_out, ring_k, ring_v, ring_pos = _DECODE_WINDOW["fn"](
                self, x, cos, sin, sink_cos, sink_sin, seg.seen, ws.ring_k, ws.ring_v, ws.ring_pos, ws.sink_k,
                ws.sink_v, ws.sink_pos, span=self._span(seg.config), attend_sinks=self.native_window is None)
            return attn_out, WindowState(ws.sink_k, ws.sink_v, ws.sink_pos, ring_k, ring_v, ring_pos)
        cfg = seg.config
        window, sinks = cfg.window, cfg.sinks  # the ring buffer's slots and the sinks held
        span = self._span(cfg)
        batch, length, _ = x.shape
        q, k, v = self._project(x)
        cos, sin, sink_cos, sink_sin = self._rotary_tables(x, seg)
        q_win, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q_sink = q_win if sink_cos is None else apply_rotary(q, sink_cos, sink_sin)
        groups = q.shape[1] // self.num_kv_heads
        split = lambda t: t.view(batch, self.num_kv_heads, groups, length, self.head_dim)  # noqa: E731
        q_win, q_sink = split(q_win), split(q_sink)
        device = x.device
        steps = torch.arange(length, device=device)
        query_pos = seg.seen[:, None] + steps[None]  # [B, T]
        total = seg.seen + seg.seq_lens

        window_state = state.window if state is not None else None
        if window_state is not None and bool((seg.seen >= sinks).all()):
            # every row has all its sinks already (any decode step after the first S tokens)
            sink_k, sink_v, sink_pos = window_state.sink_k, window_state.sink_v, window_state.sink_pos
        else:
            sink_k, sink_v, sink_pos = self._sinks(k, v, seg, window_state, total)
        sink_args = dict(q_sink=q_sink, k_sink=sink_k, v_sink=sink_v, sink_pos=sink_pos)
        if self.native_window is not None:
            sink_args = {}  # the sinks are still held (one state layout for every layer), not attended

        if window_state is None:
            keys, values, key_pos = k, v, query_pos  # keys are the segment itself (P = 0)
            out = swa_prefill(q_win, keys, values, key_pos, query_pos, window=span, scale=self.attn.scaling,
                              block=cfg.swa_block, mask_cache=seg.masks, **sink_args)
        elif length == 1:
            # decode: the new key first takes its ring slot, whose old key (position seen - W) has
            # just left the window; the ring in slot order is then every key, positions do the masking
            ring_k, ring_v, ring_pos = self._write_one(window_state.ring_k, window_state.ring_v, window_state.ring_pos,
                                                       k, v, seg.seen, seg.seq_lens)
            out = swa_dense(q_win, ring_k, ring_v, ring_pos, query_pos, window=span, scale=self.attn.scaling,
                            **sink_args)
        else:
            # the ring in position order (oldest first), then the segment: query j is key W + j
            order = (seg.seen[:, None] - window + torch.arange(window, device=device)[None]) % window
            keys = torch.cat([_gather_time(window_state.ring_k, order), k], dim=2)
            values = torch.cat([_gather_time(window_state.ring_v, order), v], dim=2)
            key_pos = torch.cat([window_state.ring_pos.gather(1, order), query_pos], dim=1)
            out = swa_prefill(q_win, keys, values, key_pos, query_pos, window=span, scale=self.attn.scaling,
                              block=cfg.swa_block, mask_cache=seg.masks, **sink_args)
        out = out.reshape(batch, -1, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
        attn_out = self.attn.o_proj(out)
        if seg.states is None:
            return attn_out, None

        # new ring: slot r holds the latest position p < total with p % W == r (a decode step wrote its slot above)
        if window_state is None or length > 1:
            slot = torch.arange(window, device=device)[None]
            newest = total[:, None] - 1
            p = newest - (newest - slot) % window  # [B, W]
            # keys/values are position-contiguous from seen (fresh) or from seen - W (ordered ring)
            base = seg.seen[:, None] - (0 if window_state is None else window)
            idx = (p - base).clamp(0, keys.shape[2] - 1)
            ring_k, ring_v = _gather_time(keys, idx), _gather_time(values, idx)
            ring_pos = torch.where(p >= 0, p, torch.full_like(p, -1))
        return attn_out, WindowState(sink_k, sink_v, sink_pos, ring_k, ring_v, ring_pos)

    def _span(self, cfg: AllMemConfig) -> int:
        """The keys this layer attends: a pretrained sliding-window layer keeps its own window (and no sinks)."""
        return cfg.window if self.native_window is None else min(cfg.window, self.native_window)

    @staticmethod
    def _write_one(ring_k: torch.Tensor, ring_v: torch.Tensor, ring_pos: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, seen: torch.Tensor, seq_lens: torch.Tensor | None):
        """The ring with one new key/value per row [B, Hkv, 1, D] at slot seen % W (in place without
        autograd). A row whose token is padding (seq_lens 0) writes back what the slot already holds:
        its key would otherwise sit in the ring at position seen, and the row's next token (same
        position) would attend to it. ``seq_lens`` None: every row's token is real."""
        batch, window = k.shape[0], ring_k.shape[2]
        write = (seen % window).view(batch, 1)
        index = write.view(batch, 1, 1, 1).expand(batch, k.shape[1], 1, k.shape[-1])
        position, new_k, new_v = seen[:, None], k, v
        if seq_lens is not None and not bool((seq_lens > 0).all()):
            real = (seq_lens > 0).view(batch, 1)
            position = torch.where(real, position, ring_pos.gather(1, write))
            new_k = torch.where(real[..., None, None], k, ring_k.gather(2, index))
            new_v = torch.where(real[..., None, None], v, ring_v.gather(2, index))
        return (scatter_state(ring_k, 2, index, new_k), scatter_state(ring_v, 2, index, new_v),
                scatter_state(ring_pos, 1, write, position))


def decode_window(attn: AllMemAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  sink_cos: torch.Tensor | None, sink_sin: torch.Tensor | None, seen: torch.Tensor,
                  ring_k: torch.Tensor, ring_v: torch.Tensor, ring_pos: torch.Tensor, sink_k: torch.Tensor,
                  sink_v: torch.Tensor, sink_pos: torch.Tensor, *, span: int, attend_sinks: bool):
    """The window attention of one steady decode token (every row real, past its sinks): x [B, 1, d],
    cos/sin [B, 1, D], seen [B], the ring [B, Hkv, W, D] / [B, W] and sinks [B, Hkv, S, D] / [B, S] ->
    (attention output [B, 1, d], ring_k, ring_v, ring_pos with the token written at slot seen % W).
    No data-dependent branch, so ``torch.compile`` takes it whole (``allmem.set_compiled``); the same
    ops as the general path's decode branch, so eager results are identical."""
    batch = x.shape[0]
    q, k, v = attn._project(x)
    q_win, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q_sink = q_win if sink_cos is None else apply_rotary(q, sink_cos, sink_sin)
    groups = q.shape[1] // attn.num_kv_heads
    q_win = q_win.view(batch, attn.num_kv_heads, groups, 1, attn.head_dim)
    q_sink = q_sink.view(batch, attn.num_kv_heads, groups, 1, attn.head_dim)
    ring_k, ring_v, ring_pos = attn._write_one(ring_k, ring_v, ring_pos, k, v, seen, None)
    sink_args = dict(q_sink=q_sink, k_sink=sink_k, v_sink=sink_v, sink_pos=sink_pos) if attend_sinks else {}
    out = swa_dense(q_win, ring_k, ring_v, ring_pos, seen[:, None], window=span, scale=attn.attn.scaling, **sink_args)
    out = out.reshape(batch, -1, 1, attn.head_dim).transpose(1, 2).reshape(batch, 1, -1)
    return attn.attn.o_proj(out), ring_k, ring_v, ring_pos


def mix(attn_out: torch.Tensor, alpha: torch.Tensor, mem_out: torch.Tensor) -> torch.Tensor:
    """y = SWA(x) + alpha * Mem(x), in the memory's dtype and back to the attention's."""
    return attn_out + (alpha.to(mem_out.dtype) * mem_out).to(attn_out.dtype)


def decode_mixer(attn: AllMemAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 sink_cos: torch.Tensor | None, sink_sin: torch.Tensor | None, seen: torch.Tensor,
                 ring_k: torch.Tensor, ring_v: torch.Tensor, ring_pos: torch.Tensor, sink_k: torch.Tensor,
                 sink_v: torch.Tensor, sink_pos: torch.Tensor, conv: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor, *, span: int, attend_sinks: bool, config: AllMemConfig):
    """The whole token mixer of one steady decode token without the memory's write: window attention
    (``decode_window``) and the memory's read (``allmem.memory.decode_read``; conv state [B, K-1, 3Hd],
    fast weights w1, w2, w3 [B, H, ., .]) mixed as y = SWA(x) + alpha * Mem(x). x [B, 1, d] ->
    (y [B, 1, d], ring_k, ring_v, ring_pos, then the memory's k, v [B, H, 1, d_h], eta, beta logits
    [B, H, 1] and conv state, which ``AllMemAttention.steady_decode`` buffers). The same ops in
    the same order as the general path, so eager results are identical; one compiled graph for every
    layer under ``set_compiled``."""
    attn_out, ring_k, ring_v, ring_pos = decode_window(
        attn, x, cos, sin, sink_cos, sink_sin, seen, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, span=span,
        attend_sinks=attend_sinks)
    mem_dtype = torch.promote_types(x.dtype, attn.alpha.dtype)
    mem_out, k, v, eta, beta_logits, conv = decode_read(attn.memory, x.to(mem_dtype), conv, FastWeights(w1, w2, w3),
                                                        config)
    return mix(attn_out, attn.alpha, mem_out), ring_k, ring_v, ring_pos, k, v, eta, beta_logits, conv


_DECODE_WINDOW = {"fn": decode_window}
_DECODE_MIXER = {"fn": decode_mixer}


def set_compiled(enabled: bool = True) -> None:
    """Run a steady decode token's token mixer (``decode_mixer``, one graph shared by every layer; for
    another memory type the window attention alone, ``decode_window``) and the memory
    (``allmem.memory.set_compiled``: its decode read and chunk step) through ``torch.compile``. The
    first call of each shape compiles (seconds); results match eager to rounding, not bit for bit.
    False: eager. ``allmem.set_compiled`` also compiles the decoder layer around the mixer."""
    set_memory_compiled(enabled)
    _DECODE_WINDOW["fn"] = torch.compile(decode_window, dynamic=False) if enabled else decode_window
    _DECODE_MIXER["fn"] = torch.compile(decode_mixer, dynamic=False) if enabled else decode_mixer
