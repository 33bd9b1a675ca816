"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import allmem
from tiny_models import tiny_base


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(window=0), "window must be a positive integer"),
        (dict(window=-3), "window must be a positive integer"),
        (dict(chunk=0), "chunk must be a positive integer"),
        (dict(sinks=-1), "sinks must be an integer >= 0"),
        (dict(positions="relative"), "positions must be one of"),
        (dict(inner_loss="l1"), "inner_loss must be one of"),
        (dict(momentum_init=1.0), "momentum_init must lie strictly between 0 and 1"),
        (dict(base_lr=0), "base_lr must be a positive number"),
    ],
)
def test_bad_config_values(kwargs, needle):
    with pytest.raises(allmem.ConfigError, match=needle):
        allmem.AllMemConfig(**kwargs)


def test_chunk_longer_than_window_warns():
    with pytest.warns(UserWarning, match="prefer chunk <= window"):
        allmem.AllMemConfig(window=64, chunk=128)


def test_unknown_config_field_in_a_saved_adapter():
    with pytest.raises(allmem.ConfigError, match="unknown AllMemConfig fields"):
        allmem.AllMemConfig.from_dict({"window": 8, "windw": 9})


def test_unsupported_family_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(allmem.UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        allmem.convert(gpt2)


def test_converting_twice_is_refused():
    model = allmem.convert(tiny_base("qwen3"))
    with pytest.raises(allmem.UnsupportedModelError, match="already an AllMem model"):
        allmem.convert(model)


@pytest.mark.parametrize("other", ["different weights", "different family"])
def test_adapter_on_the_wrong_base(tmp_path, other):
    allmem.convert(tiny_base("qwen3", seed=0)).save_pretrained(tmp_path)
    wrong = tiny_base("qwen3", seed=5) if other == "different weights" else tiny_base("llama")
    with pytest.raises(allmem.AdapterMismatchError, match="load the base it names"):
        allmem.from_pretrained(tmp_path, base=wrong)


def test_missing_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="allmem_config.json is missing"):
        allmem.from_pretrained(tmp_path, base=tiny_base("qwen3"))
    allmem.convert(tiny_base("qwen3")).save_pretrained(tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        allmem.from_pretrained(tmp_path, base=tiny_base("qwen3"))


def test_missing_and_foreign_cache_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved AllMem state"):
        allmem.AllMemCache.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an AllMem cache file"):
        allmem.AllMemCache.load(tmp_path / "other.safetensors")


def test_cache_from_another_configuration():
    model = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4))
    cache = model.new_cache()
    model.set_runtime(window=16)
    with pytest.raises(ValueError, match="start a new cache"):
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_non_contiguous_padding():
    model = allmem.convert(tiny_base("qwen3"))
    mask = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="one contiguous run of real tokens"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=mask)


def test_init_attention_needs_matching_width():
    with pytest.raises(ValueError, match="use init='random'"):
        allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(memory_head_dim=8))
    model = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(memory_head_dim=8, init="random"))
    assert model.model.layers[0].self_attn.memory.head_dim == 8
