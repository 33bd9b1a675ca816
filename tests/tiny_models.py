"""Tiny randomly initialised models of real families, built from configs (no download)."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

torch.set_num_threads(2)

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
TINY_FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict()),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
}


def tiny_base(family: str = "qwen3", seed: int = 0):
    """A randomly initialised model of a real family, built from a config (no download)."""
    config_cls, model_cls, extra = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_COMMON, **extra)).eval()
    model.allmem_base_name = f"tiny-{family}"
    return model


def randomise_memory(model, scale: float = 0.1, seed: int = 1):
    """Non-zero memory parameters and alpha, so the memory path really contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.memory_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
