"""Silent failures made loud or correct (issue 13): a padding token in a one-token step,
damaged saved states and adapters, two writers on one session, bad --session paths."""

import warnings

import pytest
import torch
from tiny_models import ids, randomise_memory, tiny_base

import allmem


# ------------------------------------------------ padding in a one-token step
@pytest.mark.parametrize("backend", ["blocked", "flex"])
@pytest.mark.parametrize("prompt,pad_step", [(12, 2), (1, 0)], ids=["in-window", "before-the-sinks-fill"])
def test_a_padding_token_in_a_one_token_step_leaves_no_key_behind(monkeypatch, backend, prompt, pad_step):
    """Row 1 gets a padding token (attention_mask 0) at one decode step. Its key must not enter
    the ring: every row's logits, through later one-token steps and a multi-token segment
    (the prefill path, FlexAttention or blocked), equal that row run alone without it."""
    monkeypatch.setenv("ALLMEM_SWA_BACKEND", backend)
    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, sinks=2, chunk=4)))
    x, steps, more = ids(2, prompt), ids(2, 6, seed=5), ids(2, 5, seed=9)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is slow
        cache = model.new_cache()
        mask = torch.ones(2, prompt, dtype=torch.long)
        model(x, attention_mask=mask, cache=cache)
        outs = []
        for t in range(steps.shape[1]):
            column = torch.tensor([[1], [0 if t == pad_step else 1]])
            mask = torch.cat([mask, column], 1)
            outs.append(model(steps[:, t : t + 1], attention_mask=mask, cache=cache).logits)
        mask = torch.cat([mask, torch.ones(2, more.shape[1], dtype=torch.long)], 1)
        last = model(more, attention_mask=mask, cache=cache).logits
        for row in range(2):
            kept = [t for t in range(steps.shape[1]) if not (row == 1 and t == pad_step)]
            alone = model(torch.cat([x[row], steps[row, kept], more[row]])[None], use_cache=False).logits[0]
            got = torch.cat([outs[t][row] for t in kept] + [last[row]])
            torch.testing.assert_close(got, alone[prompt:], rtol=1e-4, atol=1e-5, msg=f"row {row}")
    assert cache.seen.tolist() == [prompt + 11, prompt + 10]
