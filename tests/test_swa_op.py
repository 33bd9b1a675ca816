"""Sliding-window + sink attention: blocked prefill and dense form against a per-query loop."""

import math

import pytest
import torch

from allmem.ops.swa import swa_blocked, swa_dense, swa_flex, swa_sdpa


def loop_reference(q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos, window, scale):
    """For every query, list its keys explicitly and take one softmax (float64)."""
    b_, h_, g_, t_, d_ = q.shape
    out = torch.zeros(b_, h_, g_, t_, d_, dtype=torch.float64)
    for b in range(b_):
        for j in range(t_):
            t = int(query_pos[b, j])
            win = [i for i in range(k.shape[2]) if 0 <= key_pos[b, i] and t - window < key_pos[b, i] <= t]
            snk = [s for s in range(k_sink.shape[2]) if 0 <= sink_pos[b, s] <= t - window]
            for h in range(h_):
                for g in range(g_):
                    logits = [float(q[b, h, g, j] @ k[b, h, i]) * scale for i in win]
                    logits += [float(q_sink[b, h, g, j] @ k_sink[b, h, s]) * scale for s in snk]
                    if not logits:
                        continue
                    m = max(logits)
                    w = [math.exp(x - m) for x in logits]
                    z = sum(w)
                    vals = [v[b, h, i] for i in win] + [v_sink[b, h, s] for s in snk]
                    out[b, h, g, j] = sum(wi / z * vi for wi, vi in zip(w, vals))
    return out


def make(batch, heads, groups, past, length, sinks, dim=8, seed=0, seen=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, q_sink = r(batch, heads, groups, length, dim), r(batch, heads, groups, length, dim)
    k, v = r(batch, heads, past + length, dim), r(batch, heads, past + length, dim)
    seen = seen if seen is not None else [past] * batch  # tokens before the segment, per row
    base = torch.tensor(seen)[:, None]
    key_pos = base - past + torch.arange(past + length)[None]
    key_pos = key_pos.masked_fill(key_pos < 0, -1)
    query_pos = base + torch.arange(length)[None]
    k_sink, v_sink = r(batch, heads, sinks, dim), r(batch, heads, sinks, dim)
    sink_pos = torch.arange(sinks)[None].repeat(batch, 1)
    sink_pos = sink_pos.masked_fill(sink_pos >= base + length, -1)
    return q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos


CASES = [  # batch, heads, groups, past, length, sinks, window, block
    (1, 1, 1, 0, 20, 2, 6, 4),
    (2, 2, 3, 0, 37, 4, 8, 5),  # length not a multiple of the block
    (1, 2, 2, 8, 13, 3, 8, 8),  # a full past window
    (2, 1, 2, 3, 9, 4, 8, 3),  # a past shorter than the window
    (1, 1, 1, 0, 5, 0, 16, 16),  # no sinks, window longer than the sequence
    (2, 3, 1, 16, 1, 4, 16, 1),  # one decode step
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-G{}-P{}-T{}-S{}-W{}-blk{}".format(*c))
def test_blocked_and_dense_match_loop(case):
    batch, heads, groups, past, length, sinks, window, block = case
    q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos = make(batch, heads, groups, past, length, sinks)
    kw = dict(window=window, scale=0.3, q_sink=q_sink, k_sink=k_sink, v_sink=v_sink, sink_pos=sink_pos)
    expected = loop_reference(q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos, window, 0.3)
    torch.testing.assert_close(swa_blocked(q, k, v, key_pos, query_pos, block=block, **kw), expected)
    torch.testing.assert_close(swa_dense(q, k, v, key_pos, query_pos, **kw), expected)
    # the GPU path (FlexAttention with widened q/k for rolling sinks), run eagerly on CPU
    torch.testing.assert_close(swa_flex(q, k, v, key_pos, query_pos, compiled=False, **kw), expected)
    # the CPU inference path: PyTorch's fused attention with a window mask, sinks merged by log-sum-exp
    torch.testing.assert_close(swa_sdpa(q, k, v, key_pos, query_pos, **kw), expected)
    # ... with the queries in blocks, each against its band of keys
    torch.testing.assert_close(swa_sdpa(q, k, v, key_pos, query_pos, block=block, **kw), expected)


def test_rows_with_different_histories():
    """Rows that saw different numbers of tokens before the segment (batched decoding)."""
    args = make(3, 2, 2, past=6, length=7, sinks=3, seen=[0, 2, 40])
    q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos = args
    kw = dict(window=6, scale=0.5, q_sink=q_sink, k_sink=k_sink, v_sink=v_sink, sink_pos=sink_pos)
    expected = loop_reference(*args, 6, 0.5)
    torch.testing.assert_close(swa_blocked(q, k, v, key_pos, query_pos, block=4, **kw), expected)
    torch.testing.assert_close(swa_flex(q, k, v, key_pos, query_pos, compiled=False, **kw), expected)
    torch.testing.assert_close(swa_sdpa(q, k, v, key_pos, query_pos, **kw), expected)
    torch.testing.assert_close(swa_sdpa(q, k, v, key_pos, query_pos, block=3, **kw), expected)


def test_sdpa_mask_cache_reuses_a_mask_only_for_the_same_positions():
    """A mask cache shared by calls (the layers of one forward) gives every call the reference's
    result: the second call at the same positions takes the cached masks, a call at other positions
    of the same shapes (rows with other histories) builds its own."""
    cache = {}
    for seen in ([5, 5], [5, 5], [0, 9]):
        args = make(2, 2, 2, past=6, length=11, sinks=3, seen=seen)
        q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos = args
        kw = dict(window=6, scale=0.4, q_sink=q_sink, k_sink=k_sink, v_sink=v_sink, sink_pos=sink_pos, block=4)
        out = swa_sdpa(q, k, v, key_pos, query_pos, mask_cache=cache, **kw)
        torch.testing.assert_close(out, loop_reference(*args, 6, 0.4))
    assert sum(len(entries) for entries in cache.values()) == 2 * 3  # two sets of positions, three query blocks each


def test_memory_chunks_over_blocks(monkeypatch):
    """Processing blocks in several groups (long inputs) gives the same result."""
    import allmem.ops.swa.blocked as blocked

    q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos = make(1, 2, 2, 0, 50, 2)
    kw = dict(window=7, scale=0.3, q_sink=q_sink, k_sink=k_sink, v_sink=v_sink, sink_pos=sink_pos, block=4)
    whole = swa_blocked(q, k, v, key_pos, query_pos, **kw)
    monkeypatch.setattr(blocked, "_MAX_SCORE_ELEMENTS", 200)
    torch.testing.assert_close(swa_blocked(q, k, v, key_pos, query_pos, **kw), whole)


def test_backend_choice(monkeypatch):
    from allmem.ops.swa import prefill_backend

    assert prefill_backend(is_cuda=False) == "blocked"
    assert prefill_backend(is_cuda=False, fused_ok=True) == "sdpa"
    monkeypatch.setenv("ALLMEM_SWA_BACKEND", "flex")
    assert prefill_backend(is_cuda=False) == "flex"
    monkeypatch.setenv("ALLMEM_SWA_BACKEND", "fast")
    with pytest.raises(ValueError, match="ALLMEM_SWA_BACKEND='fast'"):
        prefill_backend(is_cuda=False)


def test_prefill_takes_the_fused_path_only_without_gradients_and_for_small_masks(monkeypatch):
    """swa_prefill: sdpa for no-grad calls whose per-block mask is small, blocked when training (the fused
    kernel's backward is not used) or past the mask budget; both equal the dense form."""
    import allmem.ops.swa as swa

    q, q_sink, k, v, key_pos, query_pos, k_sink, v_sink, sink_pos = make(1, 2, 2, 0, 24, 2)
    q, k, v = (t.float() for t in (q, k, v))
    kw = dict(window=8, scale=0.3, q_sink=q_sink.float(), k_sink=k_sink.float(), v_sink=v_sink.float(),
              sink_pos=sink_pos)
    calls = []
    monkeypatch.setattr(swa, "swa_sdpa", lambda *a, **k_: calls.append("sdpa") or swa_sdpa(*a, **k_))
    monkeypatch.setattr(swa, "swa_blocked", lambda *a, **k_: calls.append("blocked") or swa_blocked(*a, **k_))
    expected = swa_dense(q, k, v, key_pos, query_pos, **kw)
    with torch.no_grad():
        torch.testing.assert_close(swa.swa_prefill(q, k, v, key_pos, query_pos, **kw), expected)
    trained = q.clone().requires_grad_(True)
    torch.testing.assert_close(swa.swa_prefill(trained, k, v, key_pos, query_pos, **kw), expected)
    monkeypatch.setattr(swa, "MAX_MASK_ELEMENTS", 24 * 24 - 1)
    with torch.no_grad():
        swa.swa_prefill(q, k, v, key_pos, query_pos, **kw)
    assert calls == ["sdpa", "blocked", "blocked"]
