"""AllMem behaves like a transformers model: its state is a ``transformers.Cache``, the class
loads with ``from_pretrained``, ``save_pretrained`` refuses what it cannot do, and generate()
either does what is asked (beam search, hidden states), checked against references, or says
why not (attention weights, another cache implementation)."""

import copy

import pytest
import torch
import transformers
from transformers.integrations.peft import PeftAdapterMixin

import allmem
from allmem import AllMemCache, AllMemForCausalLM
from tiny_models import ids, randomise_memory, tiny_base


def converted(window=8, sinks=2, chunk=4, seed=0):
    model = allmem.convert(tiny_base("qwen3", seed=seed), allmem.AllMemConfig(window=window, sinks=sinks, chunk=chunk))
    return randomise_memory(model, scale=0.2).eval()


def quiet(model):
    """No end-of-sequence token (every continuation runs to max_new_tokens), padding id 0."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# --------------------------------------------------------------------------- the cache
def test_the_state_is_a_transformers_cache_answering_like_one():
    model = converted()
    cache = model.new_cache()
    assert isinstance(cache, transformers.Cache)
    assert cache.batch_size == -1 and cache.get_seq_length() == 0 and not cache.is_initialized
    assert not cache.has_previous_state()
    with torch.no_grad():
        model(ids(3, 13), cache=cache)
    assert cache.batch_size == 3 and cache.get_seq_length() == 13 and len(cache) == 2
    assert cache.is_initialized and cache.has_previous_state() and cache.has_previous_state(1)
    assert cache.get_max_length() == -1  # no maximum: the state does not grow
    assert cache.is_compileable is False and cache.is_croppable is False
    assert cache.is_linear == [False, False] and cache.is_sliding == [True, True]
    assert "AllMemCache(num_layers=2" in repr(cache)
    # what transformers' key/value layers do and a recurrent state cannot: raise, never guess
    k = torch.zeros(3, 2, 1, 16)
    for call in (lambda: cache.update(k, k, 0), lambda: cache.get_mask_sizes(1, 0),
                 lambda: cache.get_recurrent_state(0), lambda: cache.update_conv_state(k, 0),
                 lambda: cache.early_initialization(3, 2, 16, torch.float32, "cpu"),
                 cache.activate_past_recording, lambda: cache.offload(0)):
        with pytest.raises(NotImplementedError, match="AllMemCache does not support"):
            call()
    loaded_before = cache.tensors()["layers.0.window.ring_k"].clone()
    cache.crop(0)  # generate's deferred stop check crops by 0: nothing changes
    assert torch.equal(cache.tensors()["layers.0.window.ring_k"], loaded_before)
    cache.reset()
    assert cache.batch_size == -1 and cache.get_seq_length() == 0 and cache.layers == [None, None]


def test_a_cropped_state_is_refused_by_the_next_forward_and_by_save(tmp_path):
    model = converted()
    cache = model.new_cache()
    with torch.no_grad():
        model(ids(1, 9), cache=cache)
        cache.crop(-1)  # would need the dropped token back
        with pytest.raises(ValueError, match=r"cannot be continued: crop\(-1\)"):
            model(ids(1, 1), cache=cache)
    with pytest.raises(ValueError, match="cannot be continued"):
        cache.save(tmp_path / "state.safetensors")
    assert not (tmp_path / "state.safetensors").exists()


def test_a_loaded_state_is_a_cache_and_continues_exactly(tmp_path):
    model = converted()
    x = ids(2, 30)
    with torch.no_grad():
        cache = model.new_cache()
        model(x[:, :17], cache=cache)
        cache.save(tmp_path / "state.safetensors")
        expected = model(x[:, 17:], cache=cache).logits
        restored = AllMemCache.load(tmp_path / "state.safetensors")
        assert isinstance(restored, transformers.Cache) and restored.get_seq_length() == 17
        assert torch.equal(model(x[:, 17:], cache=restored).logits, expected)


@pytest.mark.parametrize("op", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"])
def test_row_operations_equal_prefilling_the_rearranged_rows(op):
    """Reordering (beam search), selecting or repeating rows of a filled state = prefilling
    the same rearrangement of the inputs; checked on the next tokens' logits."""
    model = converted()
    x = ids(3, 21)  # beyond the window: sinks, ring buffer and memory all hold state
    rows = {"reorder_cache": torch.tensor([2, 0, 0]), "batch_select_indices": torch.tensor([1, 2]),
            "batch_repeat_interleave": torch.tensor([0, 0, 1, 1, 2, 2])}[op]
    arg = 2 if op == "batch_repeat_interleave" else rows
    with torch.no_grad():
        cache = model.new_cache()
        model(x, cache=cache)
        getattr(cache, op)(arg)
        reference = model.new_cache()
        model(x[rows], cache=reference)
        nxt = ids(len(rows), 3, seed=5)
        got, expected = model(nxt, cache=cache).logits, model(nxt, cache=reference).logits
    assert cache.batch_size == len(rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- generate()
def test_beam_search_with_alpha_zero_and_a_huge_window_equals_the_original_model():
    """Reference: transformers' own beam search over the unconverted model (DynamicCache)."""
    base = quiet(tiny_base("qwen3"))
    model = quiet(allmem.convert(copy.deepcopy(base), allmem.AllMemConfig(window=64, sinks=4, chunk=16)).eval())
    x = ids(2, 12, seed=2)
    with torch.no_grad():
        expected = base.generate(x, max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False)
        got = model.generate(x, max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False)
    assert torch.equal(got, expected)


def test_beam_search_with_the_memory_equals_beam_search_without_a_cache(monkeypatch):
    """With the memory on and a window shorter than the text, the cached beam search (which
    reorders every state tensor each step) equals recomputing every step from the tokens."""
    model = quiet(converted(window=8, sinks=2, chunk=4))
    a, b = ids(1, 14, seed=3)[0], ids(1, 9, seed=4)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])  # left padding
    mask = (torch.arange(14)[None] >= torch.tensor([[0], [5]])).long()
    kw = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
    with torch.no_grad():
        cached = model.generate(batch, **kw)
        uncached = model.generate(batch, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        # the reference is sensitive to the reorder: skipping it changes the result
        monkeypatch.setattr(AllMemCache, "reorder_cache", lambda self, beam_idx: None)
        assert not torch.equal(model.generate(batch, **kw), uncached)


def test_generate_returns_hidden_states_and_refuses_attentions():
    base = tiny_base("qwen3")
    model = quiet(allmem.convert(copy.deepcopy(base), allmem.AllMemConfig(window=64, sinks=4, chunk=16)).eval())
    x = ids(2, 10)
    with torch.no_grad():
        expected = base(x, output_hidden_states=True).hidden_states
        got = model(x, output_hidden_states=True).hidden_states
        assert model(x).hidden_states is None
        assert len(got) == len(expected) == 3  # embeddings, layer 1, layer 2 after the final norm
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        out = model.generate(x, max_new_tokens=4, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)
        assert len(out.hidden_states) == 4 and out.hidden_states[0][0].shape == (2, 10, 64)
        assert out.hidden_states[1][-1].shape == (2, 1, 64)
        with pytest.raises(NotImplementedError, match="output_attentions is not available"):
            model(x, output_attentions=True)
        with pytest.raises(NotImplementedError, match="output_attentions is not available"):
            model.generate(x, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


def test_hidden_states_of_a_padded_row_equal_the_row_alone():
    model = converted(window=8, sinks=2, chunk=4)
    a, b = ids(1, 11, seed=3), ids(1, 6, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(11)[None] >= torch.tensor([[0], [5]])).long()
    with torch.no_grad():
        together = model(batch, attention_mask=mask, output_hidden_states=True).hidden_states
        alone = model(b, output_hidden_states=True).hidden_states
    for t, s in zip(together, alone):
        torch.testing.assert_close(t[1, 5:], s[0], rtol=1e-5, atol=1e-5)


def test_generate_refuses_another_cache_implementation():
    model = quiet(converted())
    with pytest.raises(ValueError, match="cache_implementation='static' cannot apply to an AllMem model"):
        model.generate(ids(1, 5), max_new_tokens=2, cache_implementation="static")


# --------------------------------------------------------------------------- save / load
def test_from_pretrained_on_the_class_equals_allmem_from_pretrained(tiny_adapter):
    """The base is resolved as allmem.load_base does (here a local directory named in the
    adapter's config); nothing is passed but the adapter's directory."""
    short = allmem.from_pretrained(tiny_adapter)
    model = AllMemForCausalLM.from_pretrained(tiny_adapter)
    assert isinstance(model, AllMemForCausalLM) and not model.training
    assert model.allmem_config == short.allmem_config and model.base_name == short.base_name
    assert model.state_dict().keys() == short.state_dict().keys()
    for name, tensor in short.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = ids(1, 40)  # beyond the tiny adapter's window of 16
    with torch.no_grad():
        assert torch.equal(model(x).logits, short(x).logits)
    assert type(model.tokenizer) is type(short.tokenizer)
    with pytest.raises(TypeError, match="unsupported arguments device_map"):
        AllMemForCausalLM.from_pretrained(tiny_adapter, device_map="auto")


def test_from_pretrained_takes_the_hub_arguments_at_their_defaults_and_refuses_them_set(tiny_adapter):
    """transformers >= 5.25's Auto classes pass every hub argument, unset; a set one would be
    silently ignored (nothing is downloaded), so it raises."""
    unset = dict(cache_dir=None, force_download=False, local_files_only=False, proxies=None, subfolder="",
                 token=None, revision=None, adapter_kwargs={})
    model = AllMemForCausalLM.from_pretrained(tiny_adapter, **unset)
    x = ids(1, 20)
    with torch.no_grad():
        assert torch.equal(model(x).logits, allmem.from_pretrained(tiny_adapter)(x).logits)
    AllMemForCausalLM.from_pretrained(tiny_adapter, local_files_only=True)
    for key, value in (("cache_dir", "/tmp/hub"), ("force_download", True), ("subfolder", "sub"), ("token", "t")):
        with pytest.raises(TypeError, match=f"unsupported arguments {key}"):
            AllMemForCausalLM.from_pretrained(tiny_adapter, **{**unset, key: value})


def test_from_pretrained_with_a_given_base(tmp_path):
    model = converted()
    model.save_pretrained(tmp_path / "adapter")
    loaded = AllMemForCausalLM.from_pretrained(tmp_path / "adapter", base=tiny_base("qwen3"))
    x = ids(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_save_pretrained_refuses_options_it_would_ignore(tmp_path):
    model = converted()
    with pytest.raises(TypeError, match="does not support push_to_hub"):
        model.save_pretrained(tmp_path / "a", push_to_hub=True)
    with pytest.raises(TypeError, match="does not support max_shard_size, state_dict"):
        model.save_pretrained(tmp_path / "a", state_dict={}, max_shard_size="1GB")
    assert not (tmp_path / "a").exists()
    model.save_pretrained(tmp_path / "b", is_main_process=False)  # another rank: writes nothing
    assert not (tmp_path / "b").exists()


def test_peft_load_adapter_keeps_its_meaning(tmp_path):
    assert AllMemForCausalLM.load_adapter is PeftAdapterMixin.load_adapter
    model = converted()
    model.save_pretrained(tmp_path / "adapter")
    target = allmem.convert(tiny_base("qwen3"), model.allmem_config)
    target.load_memory_adapter(tmp_path / "adapter")
    for name, p in model.memory_parameters().items():
        assert torch.equal(target.memory_parameters()[name], p)


@pytest.mark.real_model
def test_from_pretrained_of_the_shipped_adapter_equals_the_short_form():
    short = allmem.from_pretrained("smollm2-allmem")
    model = AllMemForCausalLM.from_pretrained("smollm2-allmem")
    assert isinstance(model.new_cache(), transformers.Cache)
    for name, tensor in short.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = short.tokenizer("The memory reads what the window forgot. " * 20, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(x).logits, short(x).logits)


# --------------------------------------------------------------------------- Auto classes
@pytest.mark.parametrize("family", ["llama", "qwen3"])  # tied and untied LM head
def test_an_exported_checkpoint_loads_with_the_auto_classes(family, tmp_path):
    model = quiet(randomise_memory(allmem.convert(tiny_base(family), allmem.AllMemConfig(window=8, sinks=2, chunk=4)),
                                   scale=0.2).eval())
    model.export_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert isinstance(config, allmem.AllMemPretrainedConfig) and config.model_type == "allmem"
    assert config.architectures == ["AllMemForCausalLM"] and config.base_model_type == family
    fields = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert fields(config.base_model_config()) == fields(model.config)  # the base's config, flat
    assert config.num_key_value_heads == model.config.num_key_value_heads and config.allmem["window"] == 8
    x = ids(2, 30)  # beyond the window: the memory weights matter
    with torch.no_grad():
        expected = model(x).logits
        expected_tokens = model.generate(x, max_new_tokens=5, do_sample=False)
        for loaded in (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"),
                       AllMemForCausalLM.from_pretrained(tmp_path / "ckpt"),
                       allmem.from_pretrained(tmp_path / "ckpt")):
            assert type(loaded) is AllMemForCausalLM and loaded.allmem_config == model.allmem_config
            assert torch.equal(loaded(x).logits, expected)
            assert torch.equal(loaded.generate(x, max_new_tokens=5, do_sample=False), expected_tokens)
            assert set(n for n, p in loaded.named_parameters() if p.requires_grad) == set(model.memory_parameters())
        other = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
        other.allmem = {**other.allmem, "window": 16}
        with pytest.raises(ValueError, match="config= can only be the checkpoint's own config"):
            AllMemForCausalLM.from_pretrained(tmp_path / "ckpt", config=other)
        half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
        assert half.lm_head.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in half.memory_parameters().values())
    tied = family == "llama"
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_an_exported_checkpoint_keeps_the_tokenizer_and_refuses_damage(tiny_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    model = allmem.from_pretrained(tiny_adapter)
    model.export_pretrained(tmp_path / "ckpt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.tokenizer("hello").input_ids == model.tokenizer("hello").input_ids
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    with pytest.raises(ValueError, match="self-contained checkpoint"):
        allmem.from_pretrained(tmp_path / "ckpt", base=tiny_base("qwen3"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith(".alpha"))
    save_file({**tensors, name: torch.full_like(tensors[name], float("nan"))}, weights)
    with pytest.raises(allmem.modeling.AdapterFileError, match="NaN or Inf"):
        AllMemForCausalLM.from_pretrained(tmp_path / "ckpt")
    save_file({n: t for n, t in tensors.items() if n != name}, weights)
    with pytest.raises(allmem.AdapterMismatchError, match="does not fit its config.json: missing"):
        AllMemForCausalLM.from_pretrained(tmp_path / "ckpt")
