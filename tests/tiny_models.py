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


def ids(batch, length, seed=0):
    """Random token ids of the tiny models' vocabulary, reproducible by seed."""
    return torch.randint(0, _COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_segments_equal_one_prefill(model, split, x=None, rtol=1e-4, atol=1e-5):
    """Feeding a sequence (``x``, else random ids) in segments of the given sizes through one
    cache equals one prefill."""
    x = ids(2, sum(split)) if x is None else x[:, :sum(split)]
    with torch.no_grad():
        whole = model(x, use_cache=False).logits
        cache, outs, start = model.new_cache(), [], 0
        for n in split:
            outs.append(model(x[:, start : start + n], cache=cache).logits)
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=rtol, atol=atol)


def assert_left_padded_batch_equals_each_row_alone(model, lengths, decode_steps):
    """A left-padded batch, prefilled then decoded ``decode_steps`` tokens, equals each row alone."""
    rows = [ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        cache = model.new_cache()
        out = model(batch, attention_mask=mask, cache=cache).logits
        extra = ids(len(rows), decode_steps, seed=7)
        dec = []
        for t in range(decode_steps):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
            dec.append(model(extra[:, t : t + 1], attention_mask=mask, cache=cache).logits)
        dec = torch.cat(dec, 1)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, extra[i]])[None], use_cache=False).logits[0]
            torch.testing.assert_close(out[i, width - len(r) :], alone[: len(r)], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dec[i], alone[len(r) :], rtol=1e-4, atol=1e-5)


def assert_saved_cache_continues_exactly(model, length, path):
    """Save the cache after 17 tokens to ``path``; the loaded copy continues bit for bit like
    the live one. Returns the loaded cache."""
    import allmem

    x = ids(2, length)
    with torch.no_grad():
        cache = model.new_cache()
        model(x[:, :17], cache=cache)
        cache.save(path)
        expected = model(x[:, 17:], cache=cache).logits
        restored = allmem.AllMemCache.load(path)
        got = model(x[:, 17:], cache=restored).logits
    assert torch.equal(got, expected)
    return restored
