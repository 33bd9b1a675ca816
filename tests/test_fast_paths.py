"""The inference fast paths (no autograd: in-place state updates, fused chunk step) against
the token-by-token reference, float64."""

import pytest
import torch
import torch._dynamo

import allmem
from allmem import layer, memory, modeling
from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms
from allmem.ops.ttt.naive import naive_ttt
from tiny_models import ids, randomise_memory, tiny_base

pytestmark = pytest.mark.usefixtures("float64_by_default")


def inputs(n, length, d, chunk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, length, d, generator=g)
    k = torch.nn.functional.normalize(torch.randn(n, length, d, generator=g), dim=-1)
    v = torch.randn(n, length, d, generator=g)
    eta = torch.rand(n, length, generator=g)
    beta = torch.rand(n, -(-length // chunk), generator=g)
    w0 = FastWeights(*(torch.randn(n, d, d, generator=g) * 1.5 / d**0.5 for _ in range(3)))
    momentum = FastWeights(*(0.01 * torch.randn(n, d, d, generator=g) for _ in range(3)))
    return (q, k, v, eta, beta, TTTState(w0, momentum), row_norms(w0))


CASES = [(1, 16, 4), (6, 19, 5), (4, 3, 8), (6, 63, 8)]


@pytest.mark.parametrize("clip", [0.3, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("loss", ["mse", "dot"])
@pytest.mark.parametrize("n,length,chunk", CASES, ids=[f"N{n}-L{l}-C{c}" for n, l, c in CASES])
def test_no_grad_chunk_op_equals_token_loop(n, length, chunk, loss, clip):
    args = inputs(n, length, 6, chunk)
    kwargs = dict(chunk_size=chunk, loss=loss, clip=clip)
    with torch.no_grad():
        o, state = chunk_ttt(*args, **kwargs)
    o_ref, ref = naive_ttt(*args, **kwargs)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip((*state.weights, *state.momentum), (*ref.weights, *ref.momentum)):
        torch.testing.assert_close(a, b)
    if length >= chunk:
        assert (state.weights.w2 - args[5].weights.w2).abs().max() > 1e-3


def test_no_grad_partial_update_mask_equals_token_loop():
    """Some memories write a chunk and others do not (the in-place path falls back per chunk)."""
    n, length, chunk = 4, 18, 4
    args = inputs(n, length, 5, chunk, seed=3)
    mask = torch.tensor([[True, True, True, True, False], [True, False, True, False, False],
                         [False, False, False, False, False], [True, True, False, True, False]])
    with torch.no_grad():
        o, state = chunk_ttt(*args, chunk_size=chunk, update_mask=mask)
    o_ref, ref = naive_ttt(*args, chunk_size=chunk, update_mask=mask)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip((*state.weights, *state.momentum), (*ref.weights, *ref.momentum)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(state.weights.w1[2], args[5].weights.w1[2], rtol=0, atol=0)  # never wrote


@pytest.mark.parametrize("masked", [False, True], ids=["all-write", "some-skip"])
@pytest.mark.parametrize("loss", ["mse", "dot"])
def test_compiled_chunk_steps_equal_token_loop(loss, masked, monkeypatch):
    """``set_compiled``: runs of GROUP chunks that every memory writes go as one compiled graph
    (here GROUP 2: chunks 0-1 and 2-3), other writing chunks as one compiled step each (some
    memories skipping them), a partial last chunk is read only; all equal the float64 token loop,
    and the compiled graphs really ran."""
    from allmem.ops.ttt import chunk as chunk_module
    from allmem.ops.ttt import set_compiled

    monkeypatch.setattr(chunk_module, "GROUP", 2)
    n, length, chunk = 4, 18, 4
    args = inputs(n, length, 5, chunk, seed=5)
    mask = None
    if masked:
        mask = torch.tensor([[True, True, True, True, False], [True, False, True, False, False],
                             [False, False, False, False, False], [True, True, True, True, False]])
    torch._dynamo.reset()
    try:
        set_compiled(True)
        with torch.no_grad():
            o, state = chunk_ttt(*args, chunk_size=chunk, update_mask=mask, loss=loss)
    finally:
        set_compiled(False)
    o_ref, ref = naive_ttt(*args, chunk_size=chunk, update_mask=mask, loss=loss)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip((*state.weights, *state.momentum), (*ref.weights, *ref.momentum)):
        torch.testing.assert_close(a, b)
    assert chunk_module._STEP["group"] is None and chunk_module._STEP["stacked"] is chunk_module._stacked_step
    compiled = chunk_module._stacked_step if masked else chunk_module._stacked_group
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(compiled.__code__)) >= 1


def test_no_grad_path_leaves_the_callers_state_alone():
    """In-place updates work on the op's own copy: the initial state passed in is not changed."""
    args = inputs(3, 24, 6, 8)
    before = [t.clone() for t in (*args[5].weights, *args[5].momentum)]
    with torch.no_grad():
        _, state = chunk_ttt(*args, chunk_size=8)
    for a, b in zip(before, (*args[5].weights, *args[5].momentum)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert all(t.is_contiguous() for t in (*state.weights, *state.momentum))


def test_no_grad_and_autograd_paths_agree_in_float32():
    torch.set_default_dtype(torch.float32)
    args = inputs(6, 300, 16, 64, seed=7)
    with torch.no_grad():
        o, state = chunk_ttt(*args, chunk_size=64)
    o2, state2 = chunk_ttt(*args, chunk_size=64)
    torch.testing.assert_close(o, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.weights.w3, state2.weights.w3, rtol=1e-5, atol=1e-5)


def tiny_converted(family: str):
    if family == "gemma3":
        from test_gemma3 import tiny_gemma3

        base = tiny_gemma3()
    else:
        base = tiny_base(family)
    return randomise_memory(allmem.convert(base, allmem.AllMemConfig(window=8, sinks=2, chunk=4)))


# where a steady decode token goes: a pre-norm decoder layer (Llama, Mistral, Qwen 2/3) through
# modeling.decode_block, Gemma 3's layer through its own forward with layer.decode_mixer inside
STEADY_PATH = {"qwen3": (modeling._DECODE_BLOCK, 6), "gemma3": (layer._DECODE_MIXER, 6)}


@pytest.mark.parametrize("family", sorted(STEADY_PATH))
def test_steady_decode_takes_the_branch_free_path_in_every_layer_and_equals_the_prefill(family, monkeypatch):
    """A decode token past the sinks, every row real, runs each layer through its branch-free steady
    function (decided once per forward); the tokens before it take the general path. Token by token
    the logits equal the prefill's, in float64."""
    model = tiny_converted(family)
    x = ids(2, 14)
    table, seen_at = STEADY_PATH[family]
    real, calls = table["fn"], []

    def counted(*args, **kwargs):
        calls.append(args[seen_at].clone())
        return real(*args, **kwargs)

    monkeypatch.setitem(table, "fn", counted)
    with torch.no_grad():
        prefill = model(x, use_cache=False).logits
        cache = model.new_cache()
        head = model(x[:, :1], cache=cache).logits  # seen 0, then 1: still inside the sinks
        steps = [model(x[:, t : t + 1], cache=cache).logits for t in range(1, x.shape[1])]
    # Gemma 3 computes some of its own parts in float32 even in a float64 model (1e-7 apart either path)
    tolerance = dict(rtol=1e-5, atol=1e-5) if family == "gemma3" else {}
    torch.testing.assert_close(torch.cat([head, *steps], dim=1), prefill, **tolerance)
    layers = len(model.model.layers)
    assert layers >= 2 and len(calls) == layers * (x.shape[1] - 2)  # every token from seen = sinks = 2 on
    assert all(bool((seen >= 2).all()) for seen in calls)


def prefill_3_then_decode(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of x [B, T] read as a 3-token prefill and then token by token with one cache."""
    with torch.no_grad():
        cache = model.new_cache()
        out = [model(x[:, :3], cache=cache).logits]
        out += [model(x[:, t : t + 1], cache=cache).logits for t in range(3, x.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_steady_decode_gives_the_general_paths_bits(family, monkeypatch):
    """Eager, the branch-free steady decode path (for pre-norm layers the whole decoder layer,
    ``decode_block``) runs the ops of the general path (the family's own decoder layer around the
    attention's decode branch) in the same order: the logits of a float32 decode through the ring's
    wrap-around and chunk writes are identical, bit for bit."""
    model = tiny_converted(family).float()
    x = ids(2, 20)

    steady = prefill_3_then_decode(model, x)

    class General(modeling.Segment):
        def __post_init__(self):
            self.steady_decode = False

    monkeypatch.setattr(modeling, "Segment", General)
    assert steady.dtype == torch.float32 and torch.equal(prefill_3_then_decode(model, x), steady)
    assert modeling.prenorm_decoder_layer(model.model.layers[0]) == (family != "gemma3")


@pytest.mark.parametrize("family", sorted(STEADY_PATH))
def test_compiled_memory_decodes_as_the_eager_prefill(family):
    """``allmem.set_compiled``: each steady decode token's decoder layer (Gemma 3: its token mixer)
    and the chunk op's read and write through torch.compile give the eager model's logits, token by
    token across chunk writes, in float64; the compiled graph is shared by the layers of a kind (no
    recompile per layer)."""
    model = tiny_converted(family)
    x = ids(2, 14)
    with torch.no_grad():
        prefill = model(x, use_cache=False).logits
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    table = STEADY_PATH[family][0]
    eager_fn = table["fn"]
    try:
        allmem.set_compiled(True)
        assert table["fn"] is not eager_fn and memory._DECODE_READ["fn"] is not memory.decode_read
        with torch.no_grad():
            cache = model.new_cache()
            head = model(x[:, :5], cache=cache).logits
            steps = [model(x[:, t : t + 1], cache=cache).logits for t in range(5, x.shape[1])]
    finally:
        allmem.set_compiled(False)
    tolerance = dict(rtol=1e-5, atol=1e-5) if family == "gemma3" else {}  # as above
    torch.testing.assert_close(torch.cat([head, *steps], dim=1), prefill, **tolerance)
    assert table["fn"] is eager_fn and memory._DECODE_READ["fn"] is memory.decode_read
    assert modeling._DECODE_BLOCK["fn"] is modeling.decode_block and layer._DECODE_MIXER["fn"] is layer.decode_mixer
    assert counters["stats"]["unique_graphs"] >= 1
    assert len(model.model.layers) >= 2
    # one graph per kind of layer (Gemma 3: its local layers keep their own window and no sinks)
    kinds = {(a._span(model.allmem_config), a.native_window) for a in (lay.self_attn for lay in model.model.layers)}
    assert len(kinds) == (2 if family == "gemma3" else 1)
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(eager_fn.__code__)) == len(kinds)


def test_a_forward_hook_fires_on_every_decode_token_and_the_logits_stay(monkeypatch):
    """The fused steady path calls the layer's submodules as functions, so a decoder layer with a
    forward hook on any of its modules (here the first layer's MLP, then the second's memory) takes
    the general path: the hook fires for every token, the other layer stays fused, and the logits
    are the same bits."""
    model = tiny_converted("qwen3").float()
    x = ids(2, 12)

    fused = prefill_3_then_decode(model, x)
    real, blocks = modeling._DECODE_BLOCK["fn"], []
    monkeypatch.setitem(modeling._DECODE_BLOCK, "fn", lambda layer, *a, **k: blocks.append(layer) or real(layer, *a, **k))
    first, second = model.model.layers[0], model.model.layers[1]
    tokens = x.shape[1] - 3 + 1  # the prefill, then each decode token (the first steady one: seen 3 > sinks 2)
    for hooked_module, other in ((first.mlp, second), (second.self_attn.memory, first)):
        fired, blocks[:] = [], []
        handle = hooked_module.register_forward_pre_hook(lambda *_: fired.append(1))
        try:
            assert torch.equal(prefill_3_then_decode(model, x), fused)
        finally:
            handle.remove()
        assert len(fired) == tokens
        assert blocks == [other] * (tokens - 1)
