"""The lm-evaluation-harness adapter (lm-eval's HFLM over a system) against direct computation,
a local task end to end, and lm-eval's own command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lm_eval  # noqa: F401  (a test dependency, the eval extra: missing, the module fails rather than skips)
import pytest
import torch
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from allmem.eval.lm_eval_adapter import UNBOUNDED, AllMemLM, simple_evaluate
from allmem.eval.systems import SystemSpecError, load_system

TASKS_DIR = Path(__file__).parent / "fixtures" / "lm_eval"
SEGMENT = 8  # shorter than the prompts below: prefilling takes several segments


@pytest.fixture(scope="module")
def converted(tiny_smollm_dir):
    system = load_system(f"allmem:{tiny_smollm_dir}?window=16&sinks=2&chunk=16&segment={SEGMENT}")
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


PAIRS = [("Question: What do bees make?\nAnswer:", " honey"),
         ("The sky is ", "blue and the grass is green"),  # trailing space moves to the continuation
         ("", "An empty context."),
         ("A much longer context, so that the batch holds rows of different lengths and right padding:", " yes")]


def test_registered_with_lm_eval():
    assert issubclass(AllMemLM, HFLM)
    assert get_model("allmem") is AllMemLM


@pytest.mark.parametrize("which", ["converted", "full"])
def test_loglikelihood_equals_direct_computation(which, request):
    system = request.getfixturevalue(which)
    lm = AllMemLM(system, progress=False)
    results = lm.loglikelihood([_req(*p) for p in PAIRS])
    tok = system.tokenizer
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
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
    assert lm.prefix_token_id == tok.bos_token_id


def test_batched_loglikelihood_equals_one_at_a_time(converted):
    # HFLM right-pads a batch without an attention mask: the memory must stay causal (a row's
    # padding is written into the memory only after every real token has read it)
    one = AllMemLM(converted, progress=False).loglikelihood([_req(*p) for p in PAIRS])
    batched = AllMemLM(converted, batch_size=4, progress=False).loglikelihood([_req(*p) for p in PAIRS])
    assert [r[0] for r in batched] == pytest.approx([r[0] for r in one], abs=1e-4)
    assert [r[1] for r in batched] == [r[1] for r in one]


def test_greedy_flag(converted):
    lm = AllMemLM(converted, progress=False)
    ids = converted.encode("Question: What color is the sky?\nAnswer:")
    greedy_ids = []
    for _ in range(3):  # the model's own argmax continuation, one token at a time
        with torch.no_grad():
            logits = converted.model(torch.tensor([ids + greedy_ids]), use_cache=False).logits[0, -1]
        greedy_ids.append(int(logits.argmax()))
    other = (greedy_ids[1] + 1) % len(converted.tokenizer)
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, ids, greedy_ids), (None, ids, [greedy_ids[0], other])])
    assert is_greedy is True and not_greedy is False


def test_max_length_and_rolling(converted, full):
    text = "Bees make honey from the nectar of flowers. " * 3
    tokens = converted.tokenizer(text).input_ids

    # converted: no limit by default, a whole document is one window
    lm = AllMemLM(converted, progress=False)
    assert lm.max_length == UNBOUNDED
    (value,) = lm.loglikelihood_rolling([_req(text)])
    assert value == pytest.approx(-float(converted.token_nlls([lm.prefix_token_id] + tokens).sum()), abs=1e-3)
    assert AllMemLM(converted, max_length=8, progress=False).max_length == 8

    # full attention: HFLM's trained context by default; a max_length scores rolling windows
    assert AllMemLM(full, progress=False).max_length == full.context_length == 8192
    (windowed,) = AllMemLM(full, max_length=8, progress=False).loglikelihood_rolling([_req(text)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.prefix_token_id, 8, 1)]
    assert len(windows) > 1
    assert windowed == pytest.approx(sum(_direct_logprob(full, c, n)[0] for c, n in windows), abs=1e-3)
    (whole,) = AllMemLM(full, progress=False).loglikelihood_rolling([_req(text)])
    assert whole == pytest.approx(-float(full.token_nlls([lm.prefix_token_id] + tokens).sum()), abs=1e-3)


def test_generate_until_prefills_through_the_cache_in_segments(converted):
    lm = AllMemLM(converted, progress=False)
    context = "Question: How many legs does a spider have? Think about it first.\nAnswer:"
    ids = converted.encode(context)
    assert len(ids) > 2 * SEGMENT
    widths: list[int] = []
    hook = converted.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    try:
        (out,) = lm.generate_until([_req(context, {"until": [], "max_gen_toks": 8})])
    finally:
        hook.remove()
    assert max(widths) <= SEGMENT  # HFLM alone would prefill the whole prompt in one forward
    free = converted.generate_ids(ids, 8)
    assert out == free
    # the same text as HFLM's own generate on the model (one forward for the prompt)
    (plain,) = HFLM(pretrained=converted.model, tokenizer=converted.tokenizer).generate_until(
        [_req(context, {"until": [], "max_gen_toks": 8})])
    assert out == plain


def test_generate_until_stops_and_batches(converted):
    lm = AllMemLM(converted, progress=False)
    contexts = ["Question: How many legs does a spider have?\nAnswer:", "Q: Bees?\nA:"]
    free = [converted.generate_ids(converted.encode(c), 8) for c in contexts]
    if len(free[0]) > 2:
        stop = free[0][1:3]
        (cut,) = lm.generate_until([_req(contexts[0], {"until": [stop], "max_gen_toks": 8, "do_sample": False})])
        assert cut == free[0][: free[0].index(stop)]
    (single,) = lm.generate_until([_req(contexts[0], {"until": "\n", "max_gen_toks": 8})])
    assert "\n" not in single
    # a left-padded batch of two prompts equals each prompt alone
    batched = AllMemLM(converted, batch_size=2, progress=False).generate_until(
        [_req(c, {"until": [], "max_gen_toks": 8}) for c in contexts])
    assert batched == free


def test_model_arguments(tiny_smollm_dir, converted):
    # typed as lm-eval types model_args: ints, a bool, a name with spaces
    lm = AllMemLM(str(tiny_smollm_dir), "swa", window=16, sinks=2, chunk=16, segment=32, skip_memory=False,
                  name="tiny swa", device="cpu", logits_cache=False, progress=False)
    assert lm.system.kind == "swa" and lm.system.segment == 32 and lm.system.name == "tiny swa"
    assert all(any(True for _ in layer.self_attn.memory.parameters()) for layer in lm.model.model.layers)
    assert (lm.model.allmem_config.window, lm.model.allmem_config.sinks) == (16, 2)
    assert lm.logits_cache is False  # an HFLM setting reaches HFLM
    assert lm.get_model_info()["allmem_system"] == lm.system.name
    with pytest.raises(SystemSpecError, match=r"unknown option\(s\) \['windw'\]"):
        AllMemLM(str(tiny_smollm_dir), "allmem", windw=16)
    with pytest.raises(ValueError, match="built system .* system options"):
        AllMemLM(converted, window=8)
    with pytest.raises(ValueError, match="batch_size=auto"):
        AllMemLM(converted, batch_size="auto")
    with pytest.raises(TypeError, match="model name, path or System"):
        AllMemLM(converted.model)


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


def test_lm_eval_command_line(tiny_smollm_dir, tmp_path):
    """``python -m allmem.eval.lm_eval_cli`` is lm-eval's CLI with ``--model allmem`` known: a
    local task on local data, offline, in a fresh interpreter (nothing imported by hand)."""
    model_args = f"pretrained={tiny_smollm_dir},system=swa,window=16,sinks=2,chunk=16"
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "allmem.eval.lm_eval_cli", "--model", "allmem", "--model_args", model_args,
         "--tasks", "allmem_tiny_mc", "--include_path", str(TASKS_DIR), "--limit", "2", "--device", "cpu",
         "--batch_size", "2", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "allmem"
    (samples_file,) = out.rglob("samples_allmem_tiny_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2

    lm = AllMemLM(load_system(f"swa:{tiny_smollm_dir}?window=16&sinks=2&chunk=16"), progress=False)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        lls = [r[0] for r in lm.loglikelihood([_req(f"Question: {doc['question']}\nAnswer:", f" {c}")
                                               for c in doc["choices"]])]
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(lls, abs=1e-4)
        correct += int(max(range(4), key=lambda i: lls[i]) == doc["answer"])
    assert results["results"]["allmem_tiny_mc"]["acc,none"] == pytest.approx(correct / 2)
