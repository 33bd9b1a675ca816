"""The lm-evaluation-harness adapter against direct computation, and a local task end to end."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lm_eval  # noqa: F401  (a test dependency, the eval extra: missing, the module fails rather than skips)
import pytest
import torch

from allmem.eval.lm_eval_adapter import AllMemLM, simple_evaluate
from allmem.eval.systems import load_system

TASKS_DIR = Path(__file__).parent / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def converted(tiny_smollm_dir):
    system = load_system(f"allmem:{tiny_smollm_dir}?window=16&sinks=2&chunk=16")
    with torch.no_grad():  # a memory that contributes, so the adapter is not just SWA
        for layer in system.model.model.layers:
            layer.self_attn.alpha.fill_(0.3)
    return system


@pytest.fixture(scope="module")
def full(tiny_smollm_dir):
    return load_system(f"full:{tiny_smollm_dir}")


def _req(*args):
    return SimpleNamespace(args=args)


def _direct_logprob(system, context_ids, continuation_ids):
    ids = torch.tensor([list(context_ids) + list(continuation_ids)])
    with torch.no_grad():
        logits = system.model(ids, **({"use_cache": False} if system.kind != "full" else {})).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    n = len(continuation_ids)
    targets = ids[0, -n:]
    rows = logp[-n:]
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


@pytest.mark.parametrize("which", ["converted", "full"])
def test_loglikelihood_equals_direct_computation(which, request):
    system = request.getfixturevalue(which)
    lm = AllMemLM(system, progress=False)
    pairs = [("Question: What do bees make?\nAnswer:", " honey"),
             ("The sky is ", "blue and the grass is green"),  # trailing space moves to the continuation
             ("", "An empty context.")]
    results = lm.loglikelihood([_req(*p) for p in pairs])
    tok = system.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context:
            stripped = context.rstrip()
            whole = tok(stripped + context[len(stripped):] + continuation).input_ids
            ctx_ids = tok(stripped).input_ids
            cont_ids = whole[len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [lm.prefix_token_id], tok(continuation).input_ids
        expected, expected_greedy = _direct_logprob(system, ctx_ids, cont_ids)
        assert logprob == pytest.approx(expected, abs=1e-3)
        assert greedy == expected_greedy
    assert lm.encode_pair("The sky is ", "blue")[1] == tok("The sky is blue").input_ids[len(tok("The sky is").input_ids):]
    assert lm.prefix_token_id == tok.bos_token_id


def test_greedy_flag(converted):
    lm = AllMemLM(converted, progress=False)
    ids = converted.encode("Question: What color is the sky?\nAnswer:")
    greedy_ids = []
    for _ in range(3):  # the model's own argmax continuation, one token at a time
        with torch.no_grad():
            logits = converted.model(torch.tensor([ids + greedy_ids]), use_cache=False).logits[0, -1]
        greedy_ids.append(int(logits.argmax()))
    assert lm.score_tokens(ids, greedy_ids)[1] is True
    other = (greedy_ids[1] + 1) % len(converted.tokenizer)
    assert lm.score_tokens(ids, [greedy_ids[0], other])[1] is False
    assert lm.score_tokens(ids, []) == (0.0, True)


def test_loglikelihood_rolling(converted, full):
    text = "Bees make honey from the nectar of flowers. " * 3
    lm = AllMemLM(converted, progress=False)
    (value,) = lm.loglikelihood_rolling([_req(text)])
    tokens = converted.tokenizer(text).input_ids
    assert value == pytest.approx(-float(converted.token_nlls([lm.prefix_token_id] + tokens).sum()), abs=1e-3)
    assert lm.max_length is None  # converted systems stream a whole document

    # a system with a context limit scores rolling windows; every token exactly once
    lm_full = AllMemLM(full, max_length=8, progress=False)
    scored = []
    original = lm_full.score_tokens
    lm_full.score_tokens = lambda ctx, cont: (scored.append((len(ctx), len(cont))), original(ctx, cont))[1]
    (windowed,) = lm_full.loglikelihood_rolling([_req(text)])
    assert sum(n for _, n in scored) == len(tokens) and all(c + n <= 9 for c, n in scored)
    assert windowed < 0
    (unbounded,) = AllMemLM(full, max_length=10**6, progress=False).loglikelihood_rolling([_req(text)])
    assert unbounded == pytest.approx(-float(full.token_nlls([lm.prefix_token_id] + tokens).sum()), abs=1e-3)
    assert AllMemLM(full, progress=False).max_length == full.context_length == 8192


def test_generate_until_is_greedy_and_stops(converted):
    lm = AllMemLM(converted, progress=False)
    context = "Question: How many legs does a spider have?\nAnswer:"
    free = converted.generate_ids(converted.encode(context), 8)
    (out,) = lm.generate_until([_req(context, {"until": [], "max_gen_toks": 8})])
    assert out == free
    if len(free) > 2:
        stop = free[1:3]
        (cut,) = lm.generate_until([_req(context, {"until": [stop], "max_gen_toks": 8, "do_sample": False})])
        assert cut == free[: free.index(stop)]
    (single,) = lm.generate_until([_req(context, {"until": "\n", "max_gen_toks": 8})])
    assert "\n" not in single


def test_simple_evaluate_on_a_local_task(tiny_smollm_dir):
    converted = load_system(f"swa:{tiny_smollm_dir}?window=16&sinks=2&chunk=16")  # streams, memory skipped
    results = simple_evaluate(converted, ["allmem_tiny_mc", "allmem_tiny_gen", "allmem_tiny_rolling"],
                              include_path=str(TASKS_DIR), include_defaults=False, progress=False,
                              log_samples=True, bootstrap_iters=0)
    mc = results["samples"]["allmem_tiny_mc"]
    assert len(mc) == 4
    lm = AllMemLM(converted, progress=False)
    correct = 0
    for sample in mc:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [lm.loglikelihood([_req(context, f" {c}")])[0][0] for c in doc["choices"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, abs=1e-4)
        correct += int(max(range(4), key=lambda i: lls[i]) == doc["answer"])
    assert results["results"]["allmem_tiny_mc"]["acc,none"] == pytest.approx(correct / 4)
    assert results["results"]["allmem_tiny_gen"]["exact_match,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert results["results"]["allmem_tiny_rolling"]["word_perplexity,none"] > 1
