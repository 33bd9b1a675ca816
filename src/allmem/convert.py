"""Conversion of a pretrained Hugging Face decoder into AllMem, and rebuilding a saved one."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import AllMemConfig
from .modeling import AllMemForCausalLM, read_adapter_config

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# model_type names of a supported family: Gemma 3's text-only checkpoints are "gemma3_text"
_FAMILY_OF = {**{name: name for name in SUPPORTED_FAMILIES}, "gemma3_text": "gemma3"}
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


class UnsupportedModelError(ValueError):
    """The base model's family has no conversion."""


class _DefaultLayerTypeRotary(nn.Module):
    """Gemma 3's rotary module needs a layer type (one table per type, rope theta 10k local and
    1M global). The converted layers pass theirs; a call without one (the model's Segment
    tables, unused by these layers) gets ``default``. The original forward passes it through."""

    def __init__(self, rotary: nn.Module, default: str):
        super().__init__()
        self.rotary, self.default = rotary, default

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        return self.rotary(x, position_ids, layer_type or self.default)


def _family(base: PreTrainedModel) -> str | None:
    return _FAMILY_OF.get(getattr(base.config, "model_type", None))


def _check_family(base: PreTrainedModel) -> None:
    model_type = getattr(base.config, "model_type", None)
    if _family(base) is None:
        raise UnsupportedModelError(
            f"cannot convert model_type {model_type!r}: AllMem supports {', '.join(SUPPORTED_FAMILIES)} "
            "(decoder-only models with rotary attention; Gemma 3 as model_type gemma3 or gemma3_text)"
        )
    if isinstance(base, AllMemForCausalLM):
        raise UnsupportedModelError("this model is already an AllMem model")
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not hasattr(base, "lm_head"):
        raise UnsupportedModelError(
            f"expected a {model_type} *ForCausalLM with .model.layers and .lm_head, got {type(base).__name__}"
        )
    for i, layer in enumerate(layers):
        missing = [name for name in _ATTENTION_PARTS if not hasattr(layer.self_attn, name)]
        if missing:
            raise UnsupportedModelError(f"layer {i}'s attention lacks {missing}; it is not a standard {model_type} attention")
    if _family(base) == "gemma3":
        text = base.config.get_text_config()
        # the converted layers compute plain softmax attention and the model applies no logit cap
        for option in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(text, option, None) is not None:
                raise UnsupportedModelError(f"{model_type} with {option}={getattr(text, option)} is not supported")
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{model_type} with bidirectional attention is not a causal decoder")


def _use_layer_types(model: AllMemForCausalLM) -> None:
    """Gemma 3: 5 local layers (sliding window 512, rope theta 10k) per global one (full
    attention, rope theta 1M). Each layer rotates with its own type's table; a local layer
    stays the pretrained sliding-window attention, its window capped by the configured one
    (the ring buffer holds that many keys) and no sinks; a global layer attends W + sinks. Every
    layer carries a memory: the state has one layout for every layer, and the local layers are
    where a token older than 512 is otherwise out of reach."""
    rotary = model.model.rotary_emb
    if not isinstance(rotary, _DefaultLayerTypeRotary):
        types = model.config.get_text_config().layer_types
        rotary = _DefaultLayerTypeRotary(rotary, "full_attention" if "full_attention" in types else types[0])
        model.model.rotary_emb = rotary
    for layer in model.model.layers:
        attn = layer.self_attn.attn
        layer.self_attn.use_layer_type(rotary.rotary, attn.layer_type, attn.sliding_window)


def init_memory_from_attention(model: AllMemForCausalLM) -> None:
    """Memory k/v := the attention's k_proj/v_proj; memory q := the mean of the q_proj heads
    of each key/value group (spec 1.1, init="attention")."""
    text = model.config.get_text_config()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            wrapper = layer.self_attn
            attn, memory = wrapper.attn, wrapper.memory
            kv_width = attn.k_proj.weight.shape[0]
            if memory.width != kv_width or memory.head_dim != attn.head_dim:
                raise ValueError(
                    f"init='attention' needs the memory to be as wide as the attention's keys/values "
                    f"({text.num_key_value_heads} heads x {attn.head_dim}), but layer {i} has "
                    f"{memory.heads} x {memory.head_dim}; use init='random' for other widths"
                )
            q = attn.q_proj.weight.view(text.num_key_value_heads, -1, attn.head_dim, text.hidden_size)
            memory.q_proj.weight.copy_(q.mean(dim=1).reshape(kv_width, text.hidden_size))
            memory.k_proj.weight.copy_(attn.k_proj.weight)
            memory.v_proj.weight.copy_(attn.v_proj.weight)
            if model.allmem_config.output_init == "attention":
                # o_proj columns per query head, summed over each key/value group's query heads
                o = attn.o_proj.weight.view(text.hidden_size, text.num_key_value_heads, -1, attn.head_dim)
                memory.o_proj.weight.copy_(o.sum(dim=2).reshape(text.hidden_size, kv_width))


def convert(base: PreTrainedModel, config: AllMemConfig | None = None, *, base_name: str | None = None) -> AllMemForCausalLM:
    """Turn ``base`` into an AllMem model in place (its layers are reused, not copied).

    Base weights are frozen; only the memory modules and alpha are trainable. With alpha = 0
    (the initial value) the result is exactly SWA + sinks; with a window >= the input length
    it is exactly the original model.
    """
    config = config or AllMemConfig()
    _check_family(base)
    for p in base.parameters():
        p.requires_grad_(False)
    reference = base.lm_head.weight
    model = AllMemForCausalLM(base, config, base_name=base_name)
    if _family(base) == "gemma3":
        _use_layer_types(model)
    # the trainable memory stays at least float32 on a bf16/fp16 base: in bf16 a weight near 1
    # (a norm gain) cannot move by less than 2**-8, so Adam steps of lr 5e-4 would round away;
    # the layer casts activations up for the memory and its output back down
    memory_dtype = torch.promote_types(reference.dtype, torch.float32)
    for p in model.memory_parameters().values():
        p.data = p.data.to(device=reference.device, dtype=memory_dtype)
        p.requires_grad_(True)
    # the Mamba-2 baseline keeps Mamba-2's own initialisation: its x/B/C/dt projections have no
    # shape-compatible counterpart in the attention (N and H*P differ from the key/value widths)
    if config.init == "attention" and config.memory_type == "ttt":
        init_memory_from_attention(model)
    if config.key_init == "query" and config.memory_type == "ttt":
        with torch.no_grad():
            for layer in model.model.layers:
                memory = layer.self_attn.memory
                memory.k_proj.weight.copy_(memory.q_proj.weight)
                memory.k_norm.weight.copy_(memory.q_norm.weight)
    model.train(base.training)
    return model


def calibrate_centre(model: AllMemForCausalLM, batches) -> int:
    """Set every memory's ``feature_mean`` (AllMemConfig.centre, ours) to the mean of its q/k/v
    features, silu(conv(projections)), over the real tokens of ``batches`` (input_ids [B, T], or
    (input_ids, attention_mask) pairs). Returns the number of tokens averaged."""
    if not model.allmem_config.centre:
        raise ValueError("calibrate_centre needs a model converted with centre=True (it has no feature_mean)")
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(index):
        def hook(memory, args):
            x, seq_lens = args[0], args[1]
            qkv = memory._qkv(x)
            empty = torch.zeros(x.shape[0], memory.conv_kernel - 1, qkv.shape[-1], dtype=qkv.dtype, device=qkv.device)
            qkv, _ = memory._conv(qkv, empty, seq_lens)
            valid = torch.arange(x.shape[1], device=x.device)[None] < seq_lens[:, None]
            features = torch.nn.functional.silu(qkv.double())[valid]  # [tokens, 3 H d_h]
            sums[index] = sums.get(index, 0) + features.sum(0)
            counts[index] = counts.get(index, 0) + features.shape[0]
        return hook

    layers = model.model.layers
    hooks = [layer.self_attn.memory.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if len(counts) != len(layers) or not all(counts.values()):
        raise ValueError("calibrate_centre saw no tokens: give it at least one non-empty batch")
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mean = layer.self_attn.memory.feature_mean
            mean.copy_((sums[i] / counts[i]).to(mean.dtype))
    return counts[0]


def from_pretrained(
    path: str | os.PathLike,
    *,
    base: PreTrainedModel | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> AllMemForCausalLM:
    """Rebuild a saved AllMem model: load the base its adapter names (or use ``base``),
    convert with the saved config and load the adapter weights. The tokenizer is attached
    as ``model.tokenizer`` when the base is loaded here. A self-contained checkpoint
    (``AllMemForCausalLM.export_pretrained``) is rebuilt from its own files instead."""
    from .loading import load_base
    from .modeling import from_checkpoint, is_checkpoint

    if is_checkpoint(path):
        if base is not None:
            raise ValueError(f"{path} is a self-contained checkpoint (it holds its base weights): do not pass base=")
        return from_checkpoint(path, dtype=dtype, device=device)
    meta = read_adapter_config(path)
    tokenizer = None
    if base is None:
        base, tokenizer = load_base(meta["base"], dtype=dtype, device=device)
    model = convert(base, AllMemConfig.from_dict(meta["allmem"]), base_name=meta["base"])
    model.load_memory_adapter(path)
    model.eval()
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model
