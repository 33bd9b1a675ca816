"""The chunked memory op against autograd and a token-by-token reference (float64)."""

import inspect

import pytest
import torch

from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms, swiglu_loss_grads
from allmem.ops.ttt.naive import naive_ttt

pytestmark = pytest.mark.usefixtures("float64_by_default")


def random_weights(n, d, expansion, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = expansion * d
    return FastWeights(
        torch.randn(n, f, d, generator=g) * scale / d**0.5,
        torch.randn(n, d, f, generator=g) * scale / f**0.5,
        torch.randn(n, f, d, generator=g) * scale / d**0.5,
    )


@pytest.mark.parametrize("loss", ["mse", "dot"])
@pytest.mark.parametrize("expansion", [1, 2])
def test_closed_form_gradients_match_autograd(loss, expansion):
    n, t, d = 3, 7, 5
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(n, t, d, generator=g), torch.randn(n, t, d, generator=g)
    eta = torch.rand(n, t, generator=g)
    weights = FastWeights(*(w.requires_grad_() for w in random_weights(n, d, expansion)))

    w1, w2, w3 = weights
    pred = k + (torch.nn.functional.silu(k @ w1.mT) * (k @ w3.mT)) @ w2.mT
    per_token = 0.5 * ((pred - v) ** 2).sum(-1) if loss == "mse" else -(pred * v).sum(-1)
    expected = torch.autograd.grad((eta * per_token).sum(), weights)

    got = swiglu_loss_grads(k, v, eta, weights, loss)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)


def make_inputs(n, length, d, chunk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, length, d, generator=g)
    k = torch.nn.functional.normalize(torch.randn(n, length, d, generator=g), dim=-1)
    v = torch.randn(n, length, d, generator=g)
    eta = torch.rand(n, length, generator=g) * 0.5
    beta = torch.rand(n, -(-length // chunk), generator=g)
    return q, k, v, eta, beta


CASES = [  # (N = batch x heads, L, C)
    (1, 16, 4),
    (6, 19, 5),  # L not a multiple of C
    (4, 3, 8),  # L < C: nothing written
    (2, 32, 32),
    (6, 63, 8),
]


@pytest.mark.parametrize("expansion", [1, 2], ids=["e1-stacked", "e2"])
@pytest.mark.parametrize("loss", ["mse", "dot"])
@pytest.mark.parametrize("n,length,chunk", CASES, ids=[f"N{n}-L{l}-C{c}" for n, l, c in CASES])
def test_chunked_equals_token_loop(n, length, chunk, loss, expansion):
    d = 6
    q, k, v, eta, beta = make_inputs(n, length, d, chunk)
    w0 = random_weights(n, d, expansion, scale=1.5)
    norms = row_norms(w0)
    momentum0 = FastWeights(*(0.01 * torch.randn_like(w) for w in w0))
    # one call for both; a small clip makes clipping active; normalisation is always active
    args, kwargs = (q, k, v, eta, beta, TTTState(w0, momentum0), norms), dict(chunk_size=chunk, loss=loss, clip=0.3)
    o, state = chunk_ttt(*args, **kwargs)
    o_ref, ref = naive_ttt(*args, **kwargs)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip(state.weights, ref.weights):
        torch.testing.assert_close(a, b)
    for a, b in zip(state.momentum, ref.momentum):
        torch.testing.assert_close(a, b)
    if length >= chunk:  # the memory really changed
        assert not torch.allclose(state.weights.w1, w0.w1)


def test_update_mask_and_zero_eta_leave_state_untouched():
    n, length, d, chunk = 4, 12, 5, 4
    q, k, v, eta, beta = make_inputs(n, length, d, chunk)
    # tokens with eta = 0 (padding): a whole chunk of row 0, scattered tokens of row 3
    silent = torch.zeros(n, length, dtype=torch.bool)
    silent[0, 4:8] = True
    silent[3, [1, 2, 9]] = True
    eta = eta.masked_fill(silent, 0.0)
    w0 = random_weights(n, d, 1)
    state0 = TTTState(w0, FastWeights(*(torch.zeros_like(w) for w in w0)))
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False], [True, True, False]])
    o, state = chunk_ttt(q, k, v, eta, beta, state0, row_norms(w0), chunk_size=chunk, update_mask=mask)
    o_ref, ref = naive_ttt(q, k, v, eta, beta, state0, row_norms(w0), chunk_size=chunk, update_mask=mask)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(state.weights.w2, ref.weights.w2)
    torch.testing.assert_close(state.weights.w1[2], w0.w1[2])  # row 2 never wrote
    # row 1 wrote one chunk only: equals running that row's first chunk alone
    _, one = chunk_ttt(q[1:2, :4], k[1:2, :4], v[1:2, :4], eta[1:2, :4], beta[1:2, :1],
                       TTTState(FastWeights(*(w[1:2] for w in w0)), FastWeights(*(torch.zeros_like(w[1:2]) for w in w0))),
                       FastWeights(*(r[1:2] for r in row_norms(w0))), chunk_size=chunk)
    torch.testing.assert_close(state.weights.w3[1:2], one.weights.w3)

    # a token with eta = 0 writes nothing: any key and value there give the same reads and state
    g = torch.Generator().manual_seed(5)
    k2 = torch.where(silent[..., None], torch.randn(k.shape, generator=g) * 10, k)
    v2 = torch.where(silent[..., None], torch.randn(v.shape, generator=g) * 10, v)
    for expansion in (1, 2):  # the stacked (e1) and the generic (e2) loop
        w = random_weights(n, d, expansion)
        start = TTTState(w, FastWeights(*(torch.zeros_like(x) for x in w)))
        a = chunk_ttt(q, k, v, eta, beta, start, row_norms(w), chunk_size=chunk, update_mask=mask)
        b = chunk_ttt(q, k2, v2, eta, beta, start, row_norms(w), chunk_size=chunk, update_mask=mask)
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-12)
        for x, y in zip((*b[1].weights, *b[1].momentum), (*a[1].weights, *a[1].momentum)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
        # whereas the same change on tokens that do write moves the state (the check has teeth)
        writes = ~silent & torch.arange(length)[None].lt(8)
        k3 = torch.where(writes[..., None], torch.randn(k.shape, generator=g), k)
        c = chunk_ttt(q, k3, v, eta, beta, start, row_norms(w), chunk_size=chunk, update_mask=mask)
        assert (c[1].weights.w1 - a[1].weights.w1).abs().max() > 1e-3


@pytest.mark.parametrize("expansion", [1, 2], ids=["e1-stacked", "e2"])
@pytest.mark.parametrize("loss", ["mse", "dot"])
def test_no_clip_matches_the_reference_and_differs_from_clipping(loss, expansion):
    """clip=None: the raw lr-weighted gradient is written, on both loops, as in the reference."""
    n, length, d, chunk = 3, 21, 6, 5
    q, k, v, eta, beta = make_inputs(n, length, d, chunk)
    eta = eta * 4  # gradients well above the clip below
    w0 = random_weights(n, d, expansion, scale=1.5)
    momentum0 = FastWeights(*(0.01 * torch.randn_like(w) for w in w0))
    norms = row_norms(w0)
    o, state = chunk_ttt(q, k, v, eta, beta, TTTState(w0, momentum0), norms, chunk_size=chunk, loss=loss, clip=None)
    o_ref, ref = naive_ttt(q, k, v, eta, beta, TTTState(w0, momentum0), norms, chunk_size=chunk, loss=loss, clip=None)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip((*state.weights, *state.momentum), (*ref.weights, *ref.momentum)):
        torch.testing.assert_close(a, b)
    # None is not the default tau = 1 in disguise: at 1 these gradients are clipped
    _, clipped = chunk_ttt(q, k, v, eta, beta, TTTState(w0, momentum0), norms, chunk_size=chunk, loss=loss, clip=1.0)
    assert (clipped.momentum.w2 - state.momentum.w2).abs().max() > 0.1


def test_outer_gradients_match_reference():
    """Gradients through the whole chunk loop (the outer loop trains q/k/v/eta/beta/W0)."""
    n, length, d, chunk = 2, 11, 4, 3
    inputs = [x.clone().requires_grad_() for x in make_inputs(n, length, d, chunk)]
    w0 = FastWeights(*(w.clone().requires_grad_() for w in random_weights(n, d, 1, scale=1.2)))

    def run(fn):
        zeros = FastWeights(*(torch.zeros_like(w) for w in w0))
        o, state = fn(*inputs, TTTState(w0, zeros), row_norms(w0), chunk_size=chunk, clip=0.5)
        objective = (o.sin()).sum() + sum((w * w).sum() for w in state.weights)
        return torch.autograd.grad(objective, [*inputs, *w0])

    for a, b in zip(run(chunk_ttt), run(naive_ttt)):
        torch.testing.assert_close(a, b)


def test_reference_and_fast_path_take_the_same_arguments():
    """Same names, order and defaults (fla trips on references whose arguments drift)."""
    assert inspect.signature(naive_ttt).parameters == inspect.signature(chunk_ttt).parameters


def test_bad_beta_shape_is_a_clear_error():
    q, k, v, eta, beta = make_inputs(2, 10, 4, 4)
    w0 = random_weights(2, 4, 1)
    with pytest.raises(ValueError, match="one per chunk"):
        chunk_ttt(q, k, v, eta, beta[:, :1], TTTState(w0, w0), row_norms(w0), chunk_size=4)


def _skip_free_reference(q, k, v, eta, beta, w0, norms, chunk, loss, clip, eps=1e-5):
    """Spec 1.3 for f_W(z) = W2 (silu(W1 z) * W3 z) (no skip), written out with autograd
    gradients: independent of the fast path's closed form and of its value shift."""
    def net(z, w):
        return (torch.nn.functional.silu(z @ w[0].mT) * (z @ w[2].mT)) @ w[1].mT

    w, m = [x.clone() for x in w0], [torch.zeros_like(x) for x in w0]
    outs = []
    for i in range(-(-q.shape[1] // chunk)):
        s, e = i * chunk, min(q.shape[1], (i + 1) * chunk)
        outs.append(net(q[:, s:e], w))
        if e - s < chunk:
            break
        wn = [(x / (x.norm(dim=-1, keepdim=True) + eps) * r).detach().requires_grad_() for x, r in zip(w, norms)]
        pred = net(k[:, s:e], wn)
        per_token = 0.5 * ((pred - v[:, s:e]) ** 2).sum(-1) if loss == "mse" else -(pred * v[:, s:e]).sum(-1)
        grads = torch.autograd.grad((eta[:, s:e] * per_token).sum(), wn)
        for j, g in enumerate(grads):
            if clip is not None:
                g = g * (clip / g.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None, None]
            m[j] = beta[:, i, None, None] * m[j] + g
            w[j] = wn[j].detach() - m[j]
    return torch.cat(outs, 1), w, m


@pytest.mark.parametrize("expansion", [1, 2], ids=["e1-stacked", "e2"])
@pytest.mark.parametrize("loss", ["mse", "dot"])
def test_skip_free_memory_matches_its_reference(loss, expansion):
    """residual=False (AllMemConfig.read_residual, ours): reads and writes of W2 h(z) alone."""
    n, length, d, chunk = 3, 19, 6, 5
    q, k, v, eta, beta = make_inputs(n, length, d, chunk)
    w0 = random_weights(n, d, expansion, scale=1.5)
    zeros = FastWeights(*(torch.zeros_like(w) for w in w0))
    o, state = chunk_ttt(q, k, v, eta, beta, TTTState(w0, zeros), row_norms(w0), chunk_size=chunk, loss=loss,
                         clip=0.3, residual=False)
    o_ref, w_ref, m_ref = _skip_free_reference(q, k, v, eta, beta, w0, row_norms(w0), chunk, loss, 0.3)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip((*state.weights, *state.momentum), (*w_ref, *m_ref)):
        torch.testing.assert_close(a, b)
    # the token-loop reference takes the same residual=False
    o_naive, naive = naive_ttt(q, k, v, eta, beta, TTTState(w0, zeros), row_norms(w0), chunk_size=chunk, loss=loss,
                               clip=0.3, residual=False)
    torch.testing.assert_close(o_naive, o_ref)
    for a, b in zip((*naive.weights, *naive.momentum), (*w_ref, *m_ref)):
        torch.testing.assert_close(a, b)
    # and it is a different memory from the spec's one (the skip matters for mse writes and every read)
    o_skip, _ = chunk_ttt(q, k, v, eta, beta, TTTState(w0, zeros), row_norms(w0), chunk_size=chunk, loss=loss, clip=0.3)
    assert not torch.allclose(o_skip, o)


@pytest.mark.parametrize("weight_norm", [True, False])
def test_skip_free_scaled_memory_prefill_equals_segments_and_decoding(weight_norm):
    """The model-level path of read_residual=False / qk_scale / weight_norm (ours): one prefill =
    segments fed through the cache, including one-token decode steps that fill and write a chunk."""
    import allmem
    from tiny_models import assert_segments_equal_one_prefill, randomise_memory, tiny_base

    config = allmem.AllMemConfig(window=8, sinks=2, chunk=4, read_residual=False, qk_scale=8.0, weight_norm=weight_norm)
    model = randomise_memory(allmem.convert(tiny_base("llama"), config)).eval()
    assert_segments_equal_one_prefill(model, [5, 1, 1, 1, 9, 1, 2])


@pytest.mark.parametrize("expansion", [1, 2], ids=["e1-stacked", "e2"])
@pytest.mark.parametrize("residual", [True, False], ids=["skip", "skip-free"])
def test_no_weight_norm_matches_the_reference_and_differs_from_it(residual, expansion):
    """reference_norms=None (AllMemConfig.weight_norm=False, ours): every write lands on the weights
    as they are; outputs, state and outer gradients equal the token loop's."""
    n, length, d, chunk = 3, 17, 5, 4
    inputs = [x.clone().requires_grad_() for x in make_inputs(n, length, d, chunk)]
    w0 = FastWeights(*(w.clone().requires_grad_() for w in random_weights(n, d, expansion, scale=1.3)))
    zeros = FastWeights(*(torch.zeros_like(w) for w in w0))

    def run(fn, norms):
        o, state = fn(*inputs, TTTState(w0, zeros), norms, chunk_size=chunk, clip=0.7, residual=residual)
        objective = o.sin().sum() + sum((w * w).sum() for w in state.weights)
        return (o, *state.weights, *state.momentum), torch.autograd.grad(objective, [*inputs, *w0])

    fast, fast_grads = run(chunk_ttt, None)
    ref, ref_grads = run(naive_ttt, None)
    for a, b in zip((*fast, *fast_grads), (*ref, *ref_grads)):
        torch.testing.assert_close(a, b)
    normed, _ = run(chunk_ttt, row_norms(w0))
    assert (normed[1] - fast[1]).abs().max() > 1e-3  # None is not the weight norm in disguise


def test_without_the_weight_norm_an_untrained_head_keeps_a_pair_through_640_writes():
    """Why weight_norm=False exists: a skip-free head (d 64, eta 0.3, momentum 0.9, no clip) writes
    one key -> value pair, then 640 random pairs, then reads the key. Without the weight norm the
    read is nearest its own value among all 641 in most memories; with it, in almost none."""
    torch.manual_seed(0)
    n, d, chunk, filler = 16, 64, 32, 640
    length = 32 + filler + chunk
    k = torch.nn.functional.normalize(torch.randn(n, length, d), dim=-1)
    v = torch.randn(n, length, d)
    q = k.clone()
    q[:, -1] = k[:, 0]  # the last token reads the first pair
    eta = torch.full((n, length), 0.3)
    beta = torch.full((n, length // chunk), 0.9)
    w0 = random_weights(n, d, 1)
    w0 = FastWeights(w0.w1, w0.w2 * 0.1, w0.w3)  # the memory's initial scale of W2
    zeros = FastWeights(*(torch.zeros_like(w) for w in w0))

    def retained(norms) -> float:
        o, _ = chunk_ttt(q, k, v, eta, beta, TTTState(w0, zeros), norms, chunk_size=chunk, clip=None, residual=False)
        sims = torch.nn.functional.normalize(v[:, :-chunk], dim=-1) @ torch.nn.functional.normalize(o[:, -1], dim=-1)[..., None]
        return float((sims[:, :, 0].argmax(1) == 0).double().mean())

    assert retained(None) >= 0.9
    assert retained(row_norms(w0)) <= 0.2


def test_weight_norm_setting_reaches_the_model():
    """weight_norm=False is not ignored on the way from the config to the op: same weights, other logits."""
    import allmem
    from tiny_models import ids, randomise_memory, tiny_base

    logits = []
    for weight_norm in (True, False):
        torch.manual_seed(0)
        config = allmem.AllMemConfig(window=4, sinks=1, chunk=4, read_residual=False, weight_norm=weight_norm)
        model = randomise_memory(allmem.convert(tiny_base("llama"), config)).eval()
        with torch.no_grad():
            logits.append(model(ids(1, 24), use_cache=False).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_no_weight_norm_without_a_clip_is_refused():
    """Without both, SmolLM2's fast weights diverge to NaN within a few hundred tokens
    (benchmarks/needle_retention.py): the config says so instead of producing NaN logits."""
    import allmem

    with pytest.raises(allmem.ConfigError, match="weight_norm=False needs clip"):
        allmem.AllMemConfig(weight_norm=False, clip=None)
    assert allmem.AllMemConfig(weight_norm=False, clip=1.0).clip == 1.0
