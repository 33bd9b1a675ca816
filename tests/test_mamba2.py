"""The Mamba-2 baseline memory: the chunked SSD scan against a float64 token-by-token
recurrence (values and gradients), the mixer against a naive row-by-row forward, the
parameter budget, and the converted model with memory_type="mamba2" (decode == prefill,
segments, padding, constant cache, save/load, trainable parameters)."""

import pytest
import torch

import allmem
from allmem.baselines.mamba2 import (
    Mamba2Dims,
    Mamba2Memory,
    Mamba2State,
    mamba2_dims_for_budget,
    mamba2_param_count,
    ttt_memory_param_count,
)
from allmem.baselines.mamba2_naive import naive_mamba2_forward
from allmem.ops.ssd import chunk_ssd, naive_ssd, ssd_step
from tiny_models import (
    assert_left_padded_batch_equals_each_row_alone,
    assert_saved_cache_continues_exactly,
    assert_segments_equal_one_prefill,
    ids,
    randomise_memory,
    tiny_base,
)

F64 = torch.float64



def scan_inputs(batch, length, heads=3, head_dim=4, state=5, seed=0, skip=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g, dtype=F64)
    dt = torch.rand(batch, length, heads, generator=g, dtype=F64) * 0.5
    for b, t in skip:  # dt = 0: the step is a no-op (how padding is kept out of the state)
        dt[b, t] = 0
    A = -(torch.rand(heads, generator=g, dtype=F64) * 2 + 0.1)
    B = torch.randn(batch, length, state, generator=g, dtype=F64)
    C = torch.randn(batch, length, state, generator=g, dtype=F64)
    h0 = torch.randn(batch, heads, head_dim, state, generator=g, dtype=F64)
    return x, dt, A, B, C, h0


# ------------------------------------------------------------------------ the scan
@pytest.mark.parametrize("length", [1, 5, 8, 16, 29])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_the_recurrence(length, with_state):
    x, dt, A, B, C, h0 = scan_inputs(2, length, skip=[(1, length - 1)])
    h0 = h0 if with_state else None
    y, final = chunk_ssd(x, dt, A, B, C, h0, chunk_size=8)
    y_ref, final_ref = naive_ssd(x, dt, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_recurrent_steps_equal_the_recurrence():
    x, dt, A, B, C, h0 = scan_inputs(2, 11, skip=[(0, 4)])
    state, ys = h0, []
    for t in range(11):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
    y_ref, final_ref = naive_ssd(x, dt, A, B, C, h0)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,chunk", [(13, 4), (3, 8)])
def test_chunked_scan_gradients_equal_the_recurrence(length, chunk):
    inputs = [t.requires_grad_() for t in scan_inputs(2, length, seed=3)]
    g = torch.Generator().manual_seed(9)
    wy = torch.randn(2, length, 3, 4, generator=g, dtype=F64)
    ws = torch.randn(2, 3, 4, 5, generator=g, dtype=F64)

    def grads(fn):
        x, dt, A, B, C, h0 = inputs
        y, final = fn(x, dt, A, B, C, h0)
        return torch.autograd.grad((y * wy).sum() + (final * ws).sum(), inputs)

    got = grads(lambda *a: chunk_ssd(*a, chunk_size=chunk))
    expected = grads(naive_ssd)
    for name, a, b in zip(["x", "dt", "A", "B", "C", "h0"], got, expected):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_bad_chunk_size_is_a_clear_error():
    x, dt, A, B, C, h0 = scan_inputs(1, 5)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        chunk_ssd(x, dt, A, B, C, h0, chunk_size=0)


# ----------------------------------------------------------------------- the mixer
def _mixer(seed=0):
    torch.manual_seed(seed)
    module = Mamba2Memory(24, Mamba2Dims(heads=2, head_dim=4, state_size=6, conv_kernel=4)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def test_mixer_on_padded_rows_and_two_segments_equals_the_naive_forward():
    module = _mixer()
    cfg = allmem.AllMemConfig(window=8, chunk=4, memory_type="mamba2")
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(3, 9, 24, generator=g, dtype=F64), torch.randn(3, 6, 24, generator=g, dtype=F64)
    lens1, lens2 = torch.tensor([9, 2, 0]), torch.tensor([6, 5, 1])
    with torch.no_grad():
        out1, state = module(x1, lens1, None, cfg, keep_state=True)
        out2, state = module(x2, lens2, state, cfg, keep_state=True)
        ref1, ref_state = naive_mamba2_forward(module, x1, lens1)
        ref2, ref_state = naive_mamba2_forward(module, x2, lens2, ref_state)
    for out, ref, lens in ((out1, ref1, lens1), (out2, ref2, lens2)):
        for b, n in enumerate(lens.tolist()):
            torch.testing.assert_close(out[b, :n], ref[b, :n], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, ref_state.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.conv, ref_state.conv, rtol=1e-10, atol=1e-10)


def test_padding_rows_do_not_change_the_state():
    module = _mixer(1)
    cfg = allmem.AllMemConfig(window=8, chunk=4, memory_type="mamba2")
    x = torch.randn(2, 7, 24, dtype=F64)
    with torch.no_grad():
        _, state = module(x, torch.tensor([7, 3]), None, cfg, keep_state=True)
        before = {k: v.clone() for k, v in state.tensors().items()}
        for step in (torch.randn(2, 1, 24, dtype=F64), torch.randn(2, 5, 24, dtype=F64)):
            _, state = module(step, torch.tensor([0, 0]), state, cfg, keep_state=True)
    for k, v in state.tensors().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------- the budget
def test_smollm2_budget_is_matched():
    cfg = allmem.AllMemConfig()
    target = ttt_memory_param_count(576, 3, 64, cfg)  # SmolLM2: hidden 576, 3 kv heads of 64
    dims = mamba2_dims_for_budget(576, target)
    assert dims == Mamba2Dims(heads=4, head_dim=64, state_size=128, conv_kernel=4)
    count = mamba2_param_count(576, dims)
    assert count == sum(p.numel() for p in Mamba2Memory(576, dims).parameters())
    assert (target, count) == (596166, 594956)
    assert abs(count - target) / target < 0.01


def test_converted_mamba2_model_is_sized_by_the_budget():
    model = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4, memory_type="mamba2"))
    memory = model.model.layers[0].self_attn.memory
    assert isinstance(memory, Mamba2Memory)
    target = ttt_memory_param_count(64, 2, 16, model.allmem_config)
    got = sum(p.numel() for p in memory.parameters())
    assert memory.head_dim == 16 and abs(got - target) / target < 0.05, (memory.dims, got, target)


def test_bad_memory_type_is_refused_with_the_choices():
    with pytest.raises(allmem.ConfigError, match=r"memory_type must be one of \('ttt', 'mamba2'\)"):
        allmem.AllMemConfig(memory_type="mamba")
    with pytest.raises(allmem.ConfigError, match="mamba_state must be None or a positive integer"):
        allmem.AllMemConfig(memory_type="mamba2", mamba_state=0)


# ------------------------------------------------------------------------ the model
def converted(window=8, sinks=2, chunk=4, **kw):
    kw = {"mamba_heads": 2, "mamba_state": 8, **kw}
    cfg = allmem.AllMemConfig(window=window, sinks=sinks, chunk=chunk, memory_type="mamba2", **kw)
    return randomise_memory(allmem.convert(tiny_base("qwen3"), cfg))


@pytest.mark.parametrize("chunk,conv", [(4, 4), (3, 2)])
def test_prefill_equals_token_by_token_decoding(chunk, conv):
    model = converted(chunk=chunk, conv_kernel=conv)
    x = ids(2, 23)
    with torch.no_grad():
        prefill = model(x, use_cache=False).logits
        cache = model.new_cache()
        steps = torch.cat([model(x[:, t : t + 1], cache=cache).logits for t in range(x.shape[1])], dim=1)
        torch.testing.assert_close(steps, prefill, rtol=1e-4, atol=1e-5)
        with model.memory_disabled():  # the memory really contributes
            assert (model(x, use_cache=False).logits - prefill).abs().max() > 1e-3


@pytest.mark.parametrize("split", [[1, 12, 16], [7, 7, 7, 8], [20, 9]])
def test_segments_of_any_size_equal_one_prefill(split):
    assert_segments_equal_one_prefill(converted(), split)


def test_left_padded_batch_equals_each_row_alone():
    assert_left_padded_batch_equals_each_row_alone(converted(), [19, 11, 4], 6)


def test_cache_size_is_constant():
    model = converted(window=16, sinks=4, chunk=8)
    cache, sizes = model.new_cache(), []
    with torch.no_grad():
        model(ids(1, 150), cache=cache)
        sizes.append(cache.nbytes())
        for n in range(3):
            model(ids(1, 1 if n == 1 else 97, seed=n + 1), cache=cache)
            sizes.append(cache.nbytes())
    assert int(cache.seen[0]) == 345
    assert len(set(sizes)) == 1, sizes
    assert all(isinstance(layer.memory, Mamba2State) for layer in cache.layers)


def test_saved_cache_continues_a_stream_exactly(tmp_path):
    restored = assert_saved_cache_continues_exactly(converted(), 26, tmp_path / "state.safetensors")
    assert all(isinstance(layer.memory, Mamba2State) for layer in restored.layers)


def test_only_the_mamba_parameters_and_alpha_train(tmp_path):
    model = converted()
    params = model.memory_parameters()
    names = {n.split(".memory.")[-1] for n in params if ".memory." in n}
    assert names == {"in_proj.weight", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "norm.weight",
                     "out_proj.weight"}
    assert sum(n.endswith(".alpha") for n in params) == len(model.model.layers)
    model.train()
    model(ids(2, 14), use_cache=False).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if name in params:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name
    # the adapter (config included) rebuilds the same model
    model.eval()
    x = ids(1, 12)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    rebuilt = allmem.from_pretrained(tmp_path / "adapter", base=tiny_base("qwen3"))
    assert isinstance(rebuilt.model.layers[0].self_attn.memory, Mamba2Memory)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, expected)
