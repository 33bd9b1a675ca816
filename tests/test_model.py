"""The converted model against independent references: the original model, a dense
sink+window mask through the original model, token-by-token decoding, single rows."""

import copy
import json

import pytest
import torch

import allmem
from tiny_models import (
    TINY_FAMILIES,
    assert_left_padded_batch_equals_each_row_alone,
    assert_saved_cache_continues_exactly,
    assert_segments_equal_one_prefill,
    ids,
    randomise_memory,
    tiny_base,
)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_alpha_zero_huge_window_is_the_original_model(family):
    base = tiny_base(family)
    x = ids(2, 50)
    with torch.no_grad():
        expected = base(x).logits
        model = allmem.convert(copy.deepcopy(base), allmem.AllMemConfig(window=64, sinks=4, chunk=16))
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,sinks", [(8, 3), (5, 0), (16, 1)])
def test_alpha_zero_small_window_equals_dense_mask_reference(window, sinks):
    """Absolute positions: the original model under a boolean sink+window mask."""
    base = tiny_base("qwen3")
    length = 45
    x = ids(1, length)
    t, j = torch.arange(length)[:, None], torch.arange(length)[None]
    allowed = (j <= t) & ((j > t - window) | (j < sinks))
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = base(x, attention_mask=mask).logits
        full = base(x).logits
        cfg = allmem.AllMemConfig(window=window, sinks=sinks, chunk=min(4, window), positions="absolute")
        got = allmem.convert(copy.deepcopy(base), cfg)(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-2  # the window really cut something


def _one_layer_qwen3():
    """One decoder layer: every key is then a function of its own token only, so a query's output
    can be rebuilt from the tokens it attends to, placed at chosen positions."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tiny_models import _COMMON

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**{**_COMMON, "num_hidden_layers": 1}, head_dim=16)).eval()


def _per_query_reference(base, x, window, sinks, rolling):
    """Logits of every query t from the original model run on exactly the tokens t attends to:
    the sinks j < S that left the window, then the window (t - W, t], with position ids that give
    RoPE the intended distances. rolling: a sink at distance min(t, S+W-1) - j, window keys at
    their true distance t - p (the query sits at min(t, S+W-1)); absolute: true positions."""
    out = []
    for t in range(x.shape[1]):
        window_keys = list(range(max(0, t - window + 1), t + 1))
        sink_keys = [j for j in range(min(sinks, t + 1)) if j <= t - window]
        here = min(t, sinks + window - 1) if rolling else t
        positions = sink_keys + [here - (t - p) for p in window_keys]
        tokens = x[:, sink_keys + window_keys]
        with torch.no_grad():
            logits = base(tokens, position_ids=torch.tensor([positions])).logits
        out.append(logits[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("window,sinks", [(8, 3), (5, 1), (6, 0)])
def test_rolling_and_absolute_sink_positions_match_a_per_query_reference(window, sinks):
    base = _one_layer_qwen3()
    x = ids(1, 40)
    got = {}
    with torch.no_grad():
        for mode in ("rolling", "absolute"):
            cfg = allmem.AllMemConfig(window=window, sinks=sinks, chunk=min(4, window), positions=mode)
            got[mode] = allmem.convert(copy.deepcopy(base), cfg)(x).logits
    for mode in ("rolling", "absolute"):
        reference = _per_query_reference(base, x, window, sinks, rolling=mode == "rolling")
        torch.testing.assert_close(got[mode], reference, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode}: {m}")
    # the two modes agree until a sink's clamped distance first differs from its true one
    edge = sinks + window - 1
    torch.testing.assert_close(got["rolling"][:, : edge + 1], got["absolute"][:, : edge + 1])
    if sinks:
        assert (got["rolling"][:, edge + 1 :] - got["absolute"][:, edge + 1 :]).abs().max() > 1e-4
    else:  # no sinks: nothing is ever seen at a clamped distance
        torch.testing.assert_close(got["rolling"], got["absolute"])


def converted(window=8, sinks=2, chunk=4, family="qwen3", **kw):
    model = allmem.convert(tiny_base(family), allmem.AllMemConfig(window=window, sinks=sinks, chunk=chunk, **kw))
    return randomise_memory(model)


@pytest.mark.parametrize("chunk,window,conv", [(4, 8, 4), (3, 8, 4), (8, 8, 0), (5, 6, 2)])
def test_prefill_equals_token_by_token_decoding(chunk, window, conv):
    model = converted(window=window, chunk=chunk, conv_kernel=conv)
    x = ids(2, 29)  # several chunk boundaries, a partial last chunk
    with torch.no_grad():
        prefill = model(x, use_cache=False).logits
        cache = model.new_cache()
        steps = torch.cat([model(x[:, t : t + 1], cache=cache).logits for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, prefill, rtol=1e-4, atol=1e-5)
    # the memory changes the output, so this is not just SWA being compared with itself
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.alpha.zero_()
        assert (model(x, use_cache=False).logits - prefill).abs().max() > 1e-3


@pytest.mark.parametrize("split", [[1, 12, 16], [7, 7, 7, 8], [20, 9]])
def test_segments_of_any_size_equal_one_prefill(split):
    assert_segments_equal_one_prefill(converted(window=8, chunk=4), split)


def test_a_padding_token_in_a_decode_step_leaves_its_row_as_it_was():
    """A one-token step in which a row's token is padding (attention mask 0: a finished or idle
    request) changes nothing of that row: its next tokens give the logits of the row run without
    that step. The window is full, so the ring slot the padding would write holds a live key."""
    model = converted(window=8, chunk=4)
    x = ids(2, 16)
    with torch.no_grad():
        cache = model.new_cache()
        model(x[:, :12], cache=cache)
        model(x[:, 12:13], attention_mask=torch.tensor([[1] * 13, [1] * 12 + [0]]), cache=cache)
        padded = model(x[:, 13:16], attention_mask=torch.tensor([[1] * 16, [1] * 12 + [0] + [1] * 3]), cache=cache).logits
        alone_cache = model.new_cache()
        model(x[1:, :12], cache=alone_cache)
        alone = model(x[1:, 13:16], cache=alone_cache).logits
    torch.testing.assert_close(padded[1:], alone, rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone():
    # decoding crosses chunk boundaries at different steps per row
    assert_left_padded_batch_equals_each_row_alone(converted(window=8, chunk=4), [23, 14, 5], 9)


def test_generate_greedy_left_padded_matches_single_rows_and_sampling_is_seeded():
    model = converted(window=8, chunk=4)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    a, b = ids(1, 11, seed=3)[0], ids(1, 6, seed=4)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = (torch.arange(11)[None] >= torch.tensor([[0], [5]])).long()
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
        for row, prompt in zip(together, (a, b)):
            alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=12, do_sample=False)[0]
            assert torch.equal(row[-12:], alone[-12:])

        def sample(seed):
            torch.manual_seed(seed)
            return model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20)

        draws = [sample(seed) for seed in (0, 0, 1, 2, 3)]
    assert draws[0].shape == (2, 23)
    assert torch.equal(draws[0], draws[1])  # the same seed draws the same tokens
    assert torch.equal(draws[0][:, :11], batch)  # the prompt is kept
    # sampling is not greedy decoding in disguise: other seeds draw other continuations, and
    # draws leave the greedy one (the tiny model's next-token distribution is broad)
    assert len({tuple(d[:, 11:].flatten().tolist()) for d in draws}) >= 4
    assert all(not torch.equal(d[:, 11:], together[:, 11:]) for d in draws)
    agree = torch.stack([(d[:, 11:] == together[:, 11:]).float().mean() for d in draws])
    assert float(agree.mean()) < 0.5, agree


def test_cache_size_is_constant():
    model = converted(window=16, sinks=4, chunk=8)
    cache, sizes = model.new_cache(), {}
    with torch.no_grad():
        model(ids(1, 1000), cache=cache)  # prefill 1k
        sizes[1000] = cache.nbytes()
        for n in range(3):
            model(ids(1, 1000, seed=n + 1), cache=cache)
        sizes[4000] = cache.nbytes()
        for _ in range(5):  # decode steps, buffer fills and flushes
            model(ids(1, 1), cache=cache)
        for n in range(12):
            model(ids(1, 1000, seed=n + 9), cache=cache)
        sizes[16005] = cache.nbytes()
    assert int(cache.seen[0]) == 16005
    assert len(set(sizes.values())) == 1, sizes


def test_saved_cache_continues_a_stream_exactly(tmp_path):
    assert_saved_cache_continues_exactly(converted(window=8, chunk=4), 30, tmp_path / "state.safetensors")
    assert not list(tmp_path.glob("*.tmp"))


def test_adapter_round_trip(tmp_path):
    model = converted(window=8, chunk=4)
    x = ids(1, 20)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter.safetensors", "allmem_config.json"]
    rebuilt = allmem.from_pretrained(tmp_path / "adapter", base=tiny_base("qwen3"))
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, expected)
    trainable = {n for n, p in rebuilt.named_parameters() if p.requires_grad}
    assert trainable == set(rebuilt.memory_parameters())
    assert all(".memory." in n or n.endswith("alpha") for n in trainable)


def test_only_memory_parameters_train():
    model = converted(window=8, chunk=4)
    model.train()
    x = ids(2, 20)
    model(x, use_cache=False).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if name in model.memory_parameters():
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_attention_initialisation_copies_keys_values_and_group_mean_queries():
    base = tiny_base("qwen3")
    q = base.model.layers[1].self_attn.q_proj.weight.detach().clone()
    k = base.model.layers[1].self_attn.k_proj.weight.detach().clone()
    model = allmem.convert(base, allmem.AllMemConfig(init="attention"))
    memory = model.model.layers[1].self_attn.memory
    assert torch.equal(memory.k_proj.weight, k)
    # 4 query heads, 2 key/value heads of 16: memory head 0 = mean of query heads 0 and 1
    torch.testing.assert_close(memory.q_proj.weight[:16], (q[:16] + q[16:32]) / 2)


def test_key_init_query_makes_the_fresh_memory_an_induction_copy():
    """After convert (post_init included), keys start as the memory's queries: with key_shift the
    key of position s is q(x_{s-1}), so a query scores highest where the previous token is its own."""
    base = tiny_base("qwen3")
    q = base.model.layers[1].self_attn.q_proj.weight.detach().clone()
    model = allmem.convert(base, allmem.AllMemConfig(init="attention", key_init="query"))
    for layer in model.model.layers:
        memory = layer.self_attn.memory
        assert torch.equal(memory.k_proj.weight, memory.q_proj.weight)
        assert torch.equal(memory.k_norm.weight, memory.q_norm.weight)
    torch.testing.assert_close(model.model.layers[1].self_attn.memory.q_proj.weight[:16], (q[:16] + q[16:32]) / 2)
    with pytest.raises(allmem.ConfigError, match="key_init"):
        allmem.AllMemConfig(key_init="value")
    # the behaviour: a random sequence with one repeated token; the query at its second occurrence
    # matches (pre-normalisation dot product of the conv outputs) the key right after its first one
    memory = model.model.layers[0].self_attn.memory
    torch.manual_seed(0)
    x = torch.randn(1, 12, base.config.hidden_size)
    x[0, 9] = x[0, 3]
    with torch.no_grad():
        qkv, _ = memory._conv(memory._qkv(x), torch.zeros(1, memory.conv_kernel - 1, 3 * memory.width), torch.tensor([12]))
        qq, kk, _ = qkv.split(memory.width, dim=-1)
    scores = kk[0, :9] @ qq[0, 9]
    assert int(scores.argmax()) == 4


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_output_init_attention_writes_what_the_group_heads_attending_to_the_value_would(family):
    """After convert (post_init included): memory o_proj applied to a per-group value equals the
    attention's o_proj applied to that value repeated to each of the group's query heads."""
    from test_gemma3 import tiny_gemma3

    base = tiny_gemma3() if family == "gemma3" else tiny_base(family)
    model = allmem.convert(base, allmem.AllMemConfig(init="attention", output_init="attention"))
    text = model.config.get_text_config()
    for layer in model.model.layers:
        attn, memory = layer.self_attn.attn, layer.self_attn.memory
        value = torch.randn(2, text.num_key_value_heads, attn.head_dim)
        groups = text.num_attention_heads // text.num_key_value_heads
        per_query_head = value.repeat_interleave(groups, dim=1).reshape(2, -1)  # query head h reads kv head h // groups
        torch.testing.assert_close(memory.o_proj(value.reshape(2, -1)), attn.o_proj(per_query_head))
    fresh = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(init="attention"))  # the default: random
    layer, text = fresh.model.layers[0].self_attn, fresh.config.get_text_config()
    value = torch.randn(2, text.num_key_value_heads, layer.attn.head_dim)
    groups = text.num_attention_heads // text.num_key_value_heads
    per_query_head = value.repeat_interleave(groups, dim=1).reshape(2, -1)
    assert not torch.allclose(layer.memory.o_proj(value.reshape(2, -1)), layer.attn.o_proj(per_query_head), atol=1e-3)
    with pytest.raises(allmem.ConfigError, match="output_init"):
        allmem.AllMemConfig(init="random", output_init="attention")


@pytest.mark.parametrize("family", [*sorted(TINY_FAMILIES), "gemma3"])
@pytest.mark.parametrize("base_lr,momentum", [(0.1, 0.5), (0.5, 0.9)])
def test_convert_keeps_the_memory_initialisation_of_the_spec(family, base_lr, momentum):
    """Regression: transformers' post_init re-initialised the new memory with the base
    family's _init_weights (eta bias 0 -> inner lr ~0.69 with token noise). After convert,
    every token's eta is base_lr and every chunk's beta is momentum_init."""
    from test_gemma3 import tiny_gemma3

    base = tiny_gemma3() if family == "gemma3" else tiny_base(family)
    model = allmem.convert(base, allmem.AllMemConfig(init="random", base_lr=base_lr, momentum_init=momentum))
    x = torch.randn(3, 7, model.config.hidden_size)
    for i, layer in enumerate(model.model.layers):
        wrapper = layer.self_attn
        memory = wrapper.memory
        assert torch.count_nonzero(wrapper.alpha) == 0, i
        for head, target in ((memory.eta_proj, base_lr), (memory.beta_proj, momentum)):
            assert torch.count_nonzero(head.weight) == 0, (i, head)
        eta = torch.nn.functional.softplus(memory.eta_proj(x))
        beta = torch.sigmoid(memory.beta_proj(x.mean(1)))
        torch.testing.assert_close(eta, torch.full_like(eta, base_lr))
        torch.testing.assert_close(beta, torch.full_like(beta, momentum))
        # conv_init key_shift (default): q and v read the current token, k the previous one
        width = memory.width
        expected = torch.zeros_like(memory.conv_weight)
        expected[:width, -1] = expected[2 * width:, -1] = 1
        expected[width : 2 * width, -2] = 1
        assert torch.equal(memory.conv_weight, expected), i
        for norm in (memory.q_norm, memory.k_norm, memory.out_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)), i
        # spec 1.2: W1, W3 ~ N(0, 1/d_h), W2 ~ N(0, 1/(e d_h)) * 0.1
        d = memory.head_dim
        assert abs(memory.w1_init.std().item() * d**0.5 - 1) < 0.2, i
        assert abs(memory.w2_init.std().item() * d**0.5 * 10 - 1) < 0.2, i


def test_identity_conv_init_reads_the_current_token_on_every_channel():
    model = allmem.convert(tiny_base("llama"), allmem.AllMemConfig(init="random", conv_init="identity"))
    for layer in model.model.layers:
        conv = layer.self_attn.memory.conv_weight
        expected = torch.zeros_like(conv)
        expected[:, -1] = 1
        assert torch.equal(conv, expected)


def test_key_shift_keys_at_t_are_the_identity_keys_at_t_minus_1():
    """The convention behind key_shift: k_t is what the identity conv gives at t - 1 (zero at
    t = 0), while q and v are unchanged, so a write at t pairs k(x_{t-1}) with v(x_t)."""
    from allmem.memory import AllMemMemory

    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    parts = {}
    for conv_init in ("identity", "key_shift"):
        cfg = allmem.AllMemConfig(conv_init=conv_init)
        torch.manual_seed(1)
        memory = AllMemMemory(32, 2, 16, cfg)
        qkv = torch.cat([memory.q_proj(x), memory.k_proj(x), memory.v_proj(x)], -1)
        out, _ = memory._conv(qkv, torch.zeros(2, memory.conv_kernel - 1, qkv.shape[-1]), torch.full((2,), 9))
        parts[conv_init] = out.split(memory.width, -1)
    (q0, k0, v0), (q1, k1, v1) = parts["identity"], parts["key_shift"]
    torch.testing.assert_close(q1, q0)
    torch.testing.assert_close(v1, v0)
    torch.testing.assert_close(k1[:, 1:], k0[:, :-1])
    assert torch.count_nonzero(k1[:, 0]) == 0


def test_flex_attention_backend_gives_the_same_model_outputs(monkeypatch):
    """The GPU prefill path (FlexAttention, here eager on CPU) inside the model: a left-padded
    batch, prefilled in two segments, equals the blocked CPU path."""
    import warnings

    model = converted(window=8, chunk=4)
    x = ids(2, 30)
    mask = torch.ones_like(x)
    mask[1, :6] = 0
    results = {}
    for backend in ("blocked", "flex"):
        monkeypatch.setenv("ALLMEM_SWA_BACKEND", backend)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = model.new_cache()
            first = model(x[:, :17], attention_mask=mask[:, :17], cache=cache).logits
            second = model(x[:, 17:], attention_mask=mask, cache=cache).logits
        results[backend] = torch.cat([first, second], 1)
    real = mask.bool()
    torch.testing.assert_close(results["flex"][real], results["blocked"][real], rtol=1e-4, atol=1e-5)


def test_adapter_saved_in_bfloat16_loads_into_a_float32_model(tmp_path):
    model = randomise_memory(converted(window=8, chunk=4))
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    meta = json.loads((tmp_path / "bf16" / "allmem_config.json").read_text())
    assert meta["dtype"] == "bfloat16"
    rebuilt = allmem.from_pretrained(tmp_path / "bf16", base=tiny_base("qwen3"))
    for name, p in rebuilt.memory_parameters().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, model.memory_parameters()[name].detach().to(torch.bfloat16).float()), name


def _conv_reference(memory, x: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv of [q | k | v] for x [1, T, d], by explicit loops (no shared code)."""
    projected = torch.cat([x[0] @ w.T for w in (memory.q_proj.weight, memory.k_proj.weight, memory.v_proj.weight)], -1)
    kernel = memory.conv_weight.shape[1]
    out = torch.zeros_like(projected)
    for t in range(projected.shape[0]):
        for tap in range(kernel):
            source = t - (kernel - 1 - tap)
            if source >= 0:
                out[t] += memory.conv_weight[:, tap] * projected[source]
    return out


def test_centre_calibration_sets_the_feature_mean_and_centres_the_features():
    """centre=True (ours): after calibrate_centre, every layer's feature_mean is the mean over the
    calibration tokens of its raw features silu(conv) (explicit-loop reference), so the features the
    memory uses there average to zero; at feature_mean = 0 the model is exactly the uncentred one."""
    base = tiny_base("qwen3")
    plain = copy.deepcopy(base)
    model = randomise_memory(allmem.convert(base, allmem.AllMemConfig(window=8, sinks=2, chunk=4, centre=True))).eval()
    reference = randomise_memory(allmem.convert(plain, allmem.AllMemConfig(window=8, sinks=2, chunk=4))).eval()
    missing, _ = model.load_state_dict(reference.state_dict(), strict=False)  # same weights, feature_mean aside
    assert {n.rsplit(".", 1)[-1] for n in missing} == {"feature_mean"}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.memory.feature_mean.zero_()
    x = ids(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, reference(x, use_cache=False).logits)

    inputs = {}  # each layer's input during the calibration pass
    hooks = [layer.self_attn.memory.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(model.model.layers)]
    assert allmem.calibrate_centre(model, [x]) == 30
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            memory = layer.self_attn.memory
            conv = _conv_reference(memory, inputs[i])
            torch.testing.assert_close(memory.feature_mean, torch.nn.functional.silu(conv).mean(0), rtol=1e-4, atol=1e-5)
            assert memory.feature_mean.abs().max() > 1e-3
            assert memory._features(conv).mean(0).abs().max() < 1e-5
    with pytest.raises(ValueError, match="centre=True"):
        allmem.calibrate_centre(reference, [x])
    with pytest.raises(allmem.ConfigError, match="centre"):
        allmem.AllMemConfig(centre=True, memory_type="mamba2")


def test_centred_memory_prefill_equals_segments_and_its_adapter_round_trips(tmp_path):
    config = allmem.AllMemConfig(window=8, sinks=2, chunk=4, centre=True)
    model = randomise_memory(allmem.convert(tiny_base("llama"), config)).eval()
    allmem.calibrate_centre(model, [ids(1, 25)])
    assert_segments_equal_one_prefill(model, [5, 1, 1, 1, 9, 1, 2])
    model.save_pretrained(tmp_path / "adapter")
    again = allmem.convert(tiny_base("llama"), config).eval()
    again.load_memory_adapter(tmp_path / "adapter")
    for a, b in zip(model.model.layers, again.model.layers):
        torch.testing.assert_close(a.self_attn.memory.feature_mean, b.self_attn.memory.feature_mean)


@pytest.mark.parametrize("family", [*sorted(TINY_FAMILIES), "gemma3"])
def test_teacher_attention_is_what_the_pretrained_attention_returns_on_the_same_inputs(family):
    """Every layer's teacher_attention, on the inputs the original model gives that layer, equals the
    original attention module's output there (Gemma 3's sliding layers keep their own window)."""
    if family == "gemma3":
        from test_gemma3 import tiny_gemma3

        base = tiny_gemma3()
    else:
        base = tiny_base(family)
    model = randomise_memory(allmem.convert(base, allmem.AllMemConfig(window=4, sinks=1, chunk=4)))
    x = ids(2, 24)
    seen_inputs, seen_outputs, segments = [], [], []

    def record_original(module, args, kwargs, out):
        seen_inputs.append(kwargs["hidden_states"])
        seen_outputs.append(out[0])

    def record_segment(module, args, kwargs, out):
        segments.append(kwargs["allmem_segment"])

    with torch.no_grad(), model.original_attention() as original:
        hooks = [layer.self_attn.register_forward_hook(record_original, with_kwargs=True)
                 for layer in original.model.layers]
        original(x)
        for hook in hooks:
            hook.remove()
    wrappers = [layer.self_attn for layer in model.model.layers]
    hooks = [w.register_forward_hook(record_segment, with_kwargs=True) for w in wrappers]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        for wrapper, hidden, expected, seg in zip(wrappers, seen_inputs, seen_outputs, segments, strict=True):
            torch.testing.assert_close(wrapper.teacher_attention(hidden, seg), expected, rtol=1e-4, atol=1e-5)
    # the converted layer itself differs: a window of 4 loses the rest
    assert not torch.allclose(wrappers[-1](seen_inputs[-1], allmem_segment=segments[-1])[0], seen_outputs[-1], atol=1e-3)
