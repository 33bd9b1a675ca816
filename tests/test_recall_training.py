"""Teaching the memory to recall: the recall tasks, per-source text, the recall margin and
the trainer's per-source CE, warm start and logging."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

import allmem
from allmem.config import ConfigError
from allmem.distill.data import document_samples
from allmem.distill.tasks import RECALL_TASKS, make_example
from allmem.distill.trainer import DistillTrainer, build_samples
from allmem.eval.recall import allmem_logits_fn, corrupt_answer, logits_logprob_fn, margin_items, recall_margins
from test_distill import tiny_recipe
from tiny_models import randomise_memory, tiny_base

DEMO_WORDS = ("captain", "Biscuit", "Alice", "418", "archive", "73914")


@pytest.fixture(scope="module")
def tokenizer():
    return allmem.load_base("smollm2")[1]


@pytest.mark.parametrize("seed", range(4))
def test_recall_tasks_put_the_answer_in_the_context_far_before_the_question(tokenizer, seed):
    for task in RECALL_TASKS:
        ex = make_example(task, tokenizer, 700, random.Random(seed), split="train")
        answer = ex.answer.strip().rstrip(".")
        n_tokens = len(tokenizer(ex.prompt).input_ids)
        assert 500 < n_tokens < 900, (task, n_tokens)
        if task == "kv_retrieval":
            lines = ex.context.splitlines()[1:]
            pairs = [line.split(": ") for line in lines]
            assert [v for k, v in pairs if k == ex.meta["key"]] == [answer]  # the key occurs once, with its value
            assert f"key {ex.meta['key']}?" in ex.question
            where = [k for k, _ in pairs].index(ex.meta["key"])
        elif task == "niah_multivalue":
            values = answer.split(", ")
            assert len(values) == 3
            for v in values:
                assert f"numbers for {ex.meta['key']} is: {v}." in ex.context
            where = ex.context.index(values[0]) / len(ex.context)
        else:
            assert answer in ex.context and ex.meta["key"] == answer
            assert not any(word in ex.prompt for word in DEMO_WORDS), "the demo's facts must stay unseen"
            where = ex.context.index(answer) / len(ex.context)
        if task == "kv_retrieval":
            assert where <= 0.6 * len(pairs)
        else:
            assert where <= 0.75, (task, where)


def test_text_samples_are_labelled_by_source_and_come_from_it(tokenizer):
    samples = document_samples(tokenizer, 12, (64, 96), seed=0, split="train", sources=("essays", "code"))
    labels = {s.source for s in samples}
    assert labels == {"text/essays", "text/code"}
    for s in samples:
        text = tokenizer.decode(s.input_ids)
        code_like = any(marker in text for marker in ("def ", "self", "    ", "import ", "return", "\"\"\"", "#"))
        if s.source == "text/code":
            assert code_like, text[:200]
    # no `sources`: the shipped recipe's single pydoc + essays stream
    assert {s.source for s in document_samples(tokenizer, 3, (64, 96), seed=0, split="train")} == {"text/corpus"}


def test_per_source_ce_weight_and_unknown_names_are_refused(tokenizer, tiny_smollm_dir, tmp_path):
    samples = build_samples([{"source": "tasks", "count": 2, "lengths": [200, 300], "tasks": ["kv_retrieval"],
                              "lambda_ce": 0.7}, {"source": "text", "count": 2, "lengths": [100, 100]}],
                            tokenizer, seed=0, split="train")
    assert [s.ce_weight for s in samples] == [0.7, 0.7, None, None]
    for bad, message in (("data=[{source: tasks, count: 1, tasks: [passkee]}]", "unknown tasks"),
                         ("data=[{source: text, count: 1, sources: [novels]}]", "unknown text sources"),
                         ("data=[{source: tasks, count: 1, lambda_ce: -1}]", "lambda_ce"),
                         ("data=[{source: tasks, count: 1, write_marks: needles}]", "write_marks")):
        with pytest.raises(ConfigError, match=message):
            tiny_recipe(tiny_smollm_dir, tmp_path, **{bad.split("=", 1)[0]: bad.split("=", 1)[1]})


def test_corrupted_answer_keeps_the_form_and_changes_every_digit():
    rng = random.Random(0)
    for answer in ("12345", "7, 100200", "room 418"):
        wrong = corrupt_answer(answer, rng)
        assert len(wrong) == len(answer)
        for a, w in zip(answer, wrong):
            assert (a == w) if not a.isdigit() else (w.isdigit() and w != a)
    with pytest.raises(ValueError, match="digits"):
        corrupt_answer("Biscuit", rng)


def test_recall_margin_equals_the_log_prob_difference_from_full_logits():
    """Against an independent computation: log-softmax over the full logits of prompt + answer."""
    model = randomise_memory(allmem.convert(tiny_base("llama"), allmem.AllMemConfig(window=16, sinks=2, chunk=8))).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 128, (40,), generator=g).tolist()
    right, wrong = [5, 6, 7], [8, 9, 10]

    def reference(answer):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = F.log_softmax(model(ids, use_cache=False).logits[0].double(), -1)
        return sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(answer))

    got = recall_margins(logits_logprob_fn(allmem_logits_fn(model)), [(prompt, right, wrong), (prompt, wrong, right)])
    expected = reference(right) - reference(wrong)
    assert got.margins[0] == pytest.approx(expected, abs=1e-4)
    assert got.margins[1] == pytest.approx(-expected, abs=1e-4)
    assert got.wins == 0.5 and abs(expected) > 1e-3


def test_margin_items_put_the_prompt_in_the_chat_template(tokenizer):
    ex = make_example("passkey", tokenizer, 300, random.Random(3), split="heldout")
    (prompt, right, wrong), = margin_items(tokenizer, [ex])
    assert tokenizer.decode(right) == ex.answer.strip().rstrip(".")
    assert len(right) == len(wrong) and right != wrong
    assert tokenizer.decode(prompt).rstrip().endswith("assistant")


def test_trainer_warm_starts_weights_ce_per_source_logs_sources_and_margins(tiny_smollm_dir, tmp_path):
    # an adapter to warm-start from
    base = allmem.load_base(str(tiny_smollm_dir))[0]
    donor = randomise_memory(allmem.convert(base, allmem.AllMemConfig(window=48, sinks=4, chunk=16)), seed=5)
    donor.save_pretrained(tmp_path / "donor")
    data = ("[{source: tasks, count: 2, lengths: [200, 300], tasks: [passkey], lambda_ce: 2.0}, "
            "{source: text, count: 2, lengths: [200, 300], sources: [code]}]")
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path / "run", steps=2, **{
        "train.init_adapter": str(tmp_path / "donor"), "data": data, "train.recall_prompts": 2,
        "train.recall_length": 200, "train.eval_every": 2, "train.lambda_ce": 0.0})
    trainer = DistillTrainer(recipe, progress=False).setup()
    for name, p in trainer.params.items():
        assert torch.equal(p, donor.memory_parameters()[name]), name
    task = next(s for s in trainer.train_samples if s.source.startswith("task/"))
    loss, res = trainer.loss_on([task])
    assert float(loss.detach()) == pytest.approx(res.kl + 2.0 * res.ce, rel=1e-5)
    text = next(s for s in trainer.train_samples if s.source == "text/code")
    loss, res = trainer.loss_on([text])
    assert float(loss.detach()) == pytest.approx(res.kl, rel=1e-5)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["source"] in ("task/passkey", "text/code") for r in records if "eval" not in r)
    (evaluation,) = [r["eval"] for r in records if "eval" in r]
    for key in ("margin_allmem", "margin_swa", "margin_full", "margin_allmem_wins"):
        assert isinstance(evaluation[key], float)


def test_synthetic_suite_records_the_recall_margin_of_numeric_answers(tiny_smollm_dir, tmp_path):
    """run_synthetic(margin=True) stores, per numeric-answer example, the same margin as an
    independent full-logits computation on the prompt the system generated from."""
    from allmem.eval.synthetic import run_synthetic
    from allmem.eval.systems import FullAttentionSystem

    base, tokenizer = allmem.load_base(str(tiny_smollm_dir))
    system = FullAttentionSystem("full", base.eval(), tokenizer, segment=128)
    result = run_synthetic(system, ["passkey", "niah_multivalue"], [300], [0.5], 1, tmp_path, chat=True,
                           progress=False, margin=True, max_new_tokens=2)
    records = {r["task"]: r for r in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    assert "margin" not in records["niah_multivalue"]  # several gold answers: no single margin
    assert set(result.margins) == {"passkey"} and "Recall margin" in (tmp_path / "scores.md").read_text()
    from allmem.eval.ruler import make_synthetic_example
    from allmem.eval.synthetic import Cell, prompt_text

    cell = Cell("passkey", 300, 0.5, 0)
    example = make_synthetic_example("passkey", tokenizer, 300, cell.rng(0), depth=0.5, split="all")
    prompt = system.encode(prompt_text(system, example, True))
    right = tokenizer(" " + example.outputs[0], add_special_tokens=False).input_ids
    rng = cell.rng(0)
    wrong = tokenizer(" " + corrupt_answer(example.outputs[0], rng), add_special_tokens=False).input_ids
    with torch.no_grad():
        def logp(answer):
            out = F.log_softmax(base(torch.tensor([prompt + answer])).logits[0].double(), -1)
            return sum(float(out[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
        expected = logp(right) - logp(wrong)
    assert records["passkey"]["margin"] == pytest.approx(expected, abs=1e-3)
    assert result.margins["passkey"][300] == pytest.approx(expected, abs=1e-3)


def test_warm_start_can_reset_the_control_heads_to_the_recipe(tiny_smollm_dir, tmp_path):
    base = allmem.load_base(str(tiny_smollm_dir))[0]
    donor = randomise_memory(allmem.convert(base, allmem.AllMemConfig(window=48, sinks=4, chunk=16)), seed=5)
    donor.save_pretrained(tmp_path / "donor")
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path / "run", steps=1, **{
        "train.init_adapter": str(tmp_path / "donor"), "train.reset_control_heads": True,
        "allmem.base_lr": 0.3, "allmem.momentum_init": 0.9, "allmem.read_residual": False})
    trainer = DistillTrainer(recipe, progress=False).setup()
    x = torch.randn(4, trainer.model.config.hidden_size)
    for name, p in trainer.params.items():
        if ".eta_proj." in name or ".beta_proj." in name:
            assert not torch.equal(p, donor.memory_parameters()[name]), name
        else:
            assert torch.equal(p, donor.memory_parameters()[name]), name
    memory = trainer._unwrapped.model.layers[0].self_attn.memory
    torch.testing.assert_close(F.softplus(memory.eta_proj(x)), torch.full((4, memory.heads), 0.3))
    torch.testing.assert_close(torch.sigmoid(memory.beta_proj(x)), torch.full((4, memory.heads), 0.9))
