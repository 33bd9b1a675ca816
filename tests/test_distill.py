"""Distillation: the loss against references, the trainer's guarantees, a 2-process run."""

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import allmem
from allmem.config import ConfigError
from allmem.distill.checkpoint import save_checkpoint
from allmem.distill.data import DataError, chat_sample, collate, length_grouped_batches, to_messages
from allmem.distill.losses import chunked_distill_loss, scored_positions
from allmem.distill.recipe import TrainSettings, load_recipe
from allmem.distill.report import run_totals
from allmem.distill.trainer import DistillTrainer, draw_runtime, lr_schedule
from tiny_models import tiny_base

REPO = Path(__file__).resolve().parents[1]


def test_kl_is_zero_when_the_student_is_the_teacher():
    base = tiny_base("qwen3")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        teacher = base.model(ids).last_hidden_state
        model = allmem.convert(copy.deepcopy(base), allmem.AllMemConfig(window=64, chunk=16))
        student = model(ids, use_cache=False, return_hidden=True).hidden_states
    out = chunked_distill_loss(student, teacher, model.lm_head, ids, mask, chunk=7)
    assert out.kl < 1e-6 and out.tokens == 2 * 39


def reference_loss(student_logits, teacher_logits, ids, mask, lambda_kl, lambda_ce):
    """Unchunked: full logits, explicit sums over the scored positions."""
    kl_sum = ce_sum = 0.0
    n = 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not mask[b, t + 1]:
                continue
            p = F.log_softmax(teacher_logits[b, t].double(), -1)
            q = F.log_softmax(student_logits[b, t].double(), -1)
            kl_sum += float((p.exp() * (p - q)).sum())
            ce_sum += float(-q[ids[b, t + 1]])
            n += 1
    return lambda_kl * kl_sum / n + lambda_ce * ce_sum / n, n


def random_head_and_batch(seed, rows, vocab, length=9, dim=8):
    """An LM head and random student / teacher hidden states and token ids [rows, length]."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's own init
    head = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(rows, length, dim, generator=g), torch.randn(rows, length, dim, generator=g)
    return head, *hidden, torch.randint(0, vocab, (rows, length), generator=g)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_loss_equals_unchunked_reference_and_ignores_masked_positions(chunk):
    head, s_hidden, t_hidden, ids = random_head_and_batch(seed=0, rows=2, vocab=11)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected, n = reference_loss(head(s_hidden), head(t_hidden), ids, mask, 1.0, 0.5)
    got = chunked_distill_loss(s_hidden, t_hidden, head, ids, mask, lambda_kl=1.0, lambda_ce=0.5, chunk=chunk)
    assert got.tokens == n == 11
    assert math.isclose(float(got.loss.detach()), expected, rel_tol=1e-5)
    # anything at unscored positions changes nothing
    scored = scored_positions(mask)
    noisy_s, noisy_t = s_hidden.clone(), t_hidden.clone()
    noisy_s[~scored] += 100 * torch.randn_like(noisy_s[~scored])
    noisy_t[~scored] -= 50
    again = chunked_distill_loss(noisy_s, noisy_t, head, ids, mask, lambda_kl=1.0, lambda_ce=0.5, chunk=chunk)
    assert math.isclose(float(again.loss.detach()), float(got.loss.detach()), rel_tol=1e-6)


def reference_order_loss(student_logits, ids, mask, order_rows, margin):
    """Per batch row and scored position t whose next position is scored too and whose next answer
    token differs: softplus(z[next token] - z[right token] + margin), summed over the loops, / scored."""
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not mask[b, t + 1]:
                continue
            n += 1
            if not order_rows[b] or t + 2 >= ids.shape[1] or not mask[b, t + 2] or ids[b, t + 2] == ids[b, t + 1]:
                continue
            z = student_logits[b, t].double()
            total += float(F.softplus(z[ids[b, t + 2]] - z[ids[b, t + 1]] + margin))
    return total / n


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_the_answer_order_loss_equals_a_loop_over_the_answer_tokens(chunk):
    head, s_hidden, t_hidden, ids = random_head_and_batch(seed=1, rows=3, vocab=6)
    ids[0, 5] = ids[0, 4]  # a repeated answer token: no competitor there
    ids[0, 6] = (ids[0, 5] + 1) % 6
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 1, 1, 0, 0]])
    rows = torch.tensor([True, True, False])  # the third sample is plain text: not scored for order
    plain = chunked_distill_loss(s_hidden, t_hidden, head, ids, mask, lambda_kl=1.0, lambda_ce=0.5, chunk=chunk)
    got = chunked_distill_loss(s_hidden, t_hidden, head, ids, mask, lambda_kl=1.0, lambda_ce=0.5, chunk=chunk,
                               lambda_order=0.7, order_margin=1.5, order_rows=rows)
    with torch.no_grad():
        expected = reference_order_loss(head(s_hidden), ids, mask, rows, 1.5)
    assert expected > 0 and math.isclose(got.order, expected, rel_tol=1e-5)
    assert math.isclose(float(got.loss.detach()), float(plain.loss.detach()) + 0.7 * expected, rel_tol=1e-5)
    assert plain.order == 0.0
    # its gradient lowers the next answer token's logit against the right one's
    logits = head(s_hidden).detach().requires_grad_()
    eye = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(6))
    n = int(scored_positions(mask).sum())
    chunked_distill_loss(logits, None, eye, ids, mask, lambda_kl=0.0, lambda_order=1.0, order_rows=rows,
                         teacher_topk=(torch.zeros(n, 1, dtype=torch.int32), torch.zeros(n, 1))).loss.backward()
    assert logits.grad[0, 4, ids[0, 6]] > 0 and logits.grad[0, 4, ids[0, 5]] < 0  # position 4 predicts ids[0, 5]
    assert logits.grad[0, 3].abs().sum() == 0 and logits.grad[2].abs().sum() == 0  # repeated token; text row


def test_hand_computed_kl():
    """One scored position, vocabulary of 2: teacher (0.5, 0.5), student (0.8, 0.2)."""
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    teacher = torch.zeros(1, 2, 2)
    student = torch.zeros(1, 2, 2)
    student[0, 0] = torch.tensor([math.log(0.8), math.log(0.2)])
    out = chunked_distill_loss(student, teacher, head, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # 0.2231
    assert math.isclose(out.kl, expected, rel_tol=1e-6)
    assert math.isclose(out.ce, -math.log(0.2), rel_tol=1e-6)


def test_sampled_window_sinks_chunk_stay_in_range_and_change():
    recipe = load_recipe("smollm2-cpu")
    draws = [draw_runtime(recipe, step) for step in range(60)]
    for d in draws:
        assert 128 <= d["window"] <= 512 and 1 <= d["sinks"] <= 8 and 64 <= d["chunk"] <= 256
        assert d["chunk"] <= d["window"]
    for key in ("window", "sinks", "chunk"):
        assert len({d[key] for d in draws}) > 5
    assert draws == [draw_runtime(recipe, step) for step in range(60)]  # deterministic per step


def test_chat_formats_and_response_only_mask():
    _, tok = allmem.load_base("smollm2")
    record = {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi there"}]}
    sample = chat_sample(tok, to_messages(record, "x:1"), 512)
    scored = tok.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])
    assert scored.startswith("Hi there") and "Say hi" not in scored
    assert to_messages({"prompt": "a", "response": "b"}, "x")[1] == {"role": "assistant", "content": "b"}
    with pytest.raises(DataError, match="f.jsonl:3: no 'messages'"):
        to_messages({"question": "?"}, "f.jsonl:3")


def test_batches_do_not_mix_samples():
    from allmem.distill.data import Sample

    samples = [Sample(list(range(n)), [1] * n, "x") for n in (5, 9, 3, 7)]
    batches = length_grouped_batches(samples, 2, seed=0)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    ids, attn, mask = collate([samples[i] for i in batches[0]], pad_id=0)
    assert attn.sum(1).tolist() == [len(samples[i]) for i in batches[0]]


def tiny_recipe(model_dir, out, steps=4, **extra):
    return load_recipe("smollm2-cpu", tiny_overrides(model_dir, out, steps, **extra))


def tiny_overrides(model_dir, out, steps=4, **extra):
    return [
        f"base={model_dir}", f"train.output_dir={out}", f"train.steps={steps}", "train.save_every=2",
        "train.eval_every=0", "train.warmup_steps=1", "train.lr=3e-3",
        "data=[{source: tasks, count: 6, lengths: [200, 300]}, {source: text, count: 3, lengths: [200, 300]}]",
        "heldout=[{source: text, count: 2, lengths: [256, 256]}]",
        "randomize={window: [32, 64], sinks: [1, 4], chunk: [8, 32]}", "allmem.window=48", "allmem.chunk=16",
        *[f"{k}={v}" for k, v in extra.items()],
    ]


def previous_wsd_factor(step: int, steps: int, warmup: int, decay_fraction: float) -> float:
    """The trainer's own warmup-stable-decay before it used transformers' get_wsd_schedule."""
    decay_start = int(steps * (1 - decay_fraction))
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if step >= decay_start:
        return max(0.0, (steps - step) / max(1, steps - decay_start))
    return 1.0


def scheduled_lrs(settings: TrainSettings) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    scheduler = lr_schedule(optimizer, settings)
    lrs = []
    for _ in range(settings.steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("steps,warmup,decay_fraction", [(10, 3, 0.4), (100, 10, 0.3), (4, 3, 0.5), (6, 0, 0.0),
                                                          (200, 10, 0.2)])
def test_lr_schedule_is_transformers_wsd_one_warmup_step_later_than_before(steps, warmup, decay_fraction):
    """get_wsd_schedule starts the warmup at lr 0 (step 1 only warms Adam's moments): during the
    warmup every step has the lr the step before had; from the end of the warmup on, the
    sequence is the previous one exactly (the decay rounds its start the same way)."""
    settings = TrainSettings(steps=steps, warmup_steps=warmup, decay_fraction=decay_fraction, lr=1.0)
    previous = [previous_wsd_factor(step, steps, warmup, decay_fraction) for step in range(steps)]
    expected = [step / warmup if step < warmup else previous[step] for step in range(steps)]
    assert scheduled_lrs(settings) == pytest.approx(expected, abs=1e-12)
    if (steps, warmup, decay_fraction) == (10, 3, 0.4):
        assert scheduled_lrs(settings) == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1, 1, 0.75, 0.5, 0.25])


def test_only_memory_trains_and_resume_reproduces_the_uninterrupted_run(tiny_smollm_dir, tmp_path):
    full = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "a"), progress=False).setup()
    frozen = {n: p.detach().clone() for n, p in full._unwrapped.named_parameters() if n not in full.params}
    before = {n: p.detach().clone() for n, p in full.params.items()}
    losses = [r.loss for r in full.train()]
    for n, p in full._unwrapped.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
        else:
            assert p.requires_grad
    assert all(not torch.equal(full.params[n], before[n]) for n in before if n.endswith("alpha"))
    logged = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in logged] == pytest.approx(scheduled_lrs(full.recipe.train))  # the lr each step used

    first = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "b"), progress=False).setup()
    head = [r.loss for r in first.train(stop_after=2)]  # "killed" after the step-2 checkpoint
    checkpoint = tmp_path / "b" / "checkpoints" / "step-000002"
    # accelerate's save_state wrote the optimizer and this process's RNG; the frozen base is not saved
    assert {"trainable.safetensors", "optimizer.bin", "random_states_0.pkl", "state.json"} <= {
        p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("model*.safetensors"))
    # the same state in the format written before save_state (a run started by older code)
    save_checkpoint(tmp_path / "old" / "checkpoints", 2, first.params, first.optimizer, first.scheduler,
                    {"recipe": first.recipe.name})
    resumed = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "b"), resume=True, progress=False).setup()
    assert resumed.step == 2
    tail = [r.loss for r in resumed.train()]
    torch.testing.assert_close(torch.tensor(head + tail), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "b" / "adapter" / "adapter.safetensors").is_file()
    assert not list((tmp_path / "b" / "checkpoints").glob(".checkpoint.*"))
    # the adapter records the recipe's window/sinks/chunk (48/.../16), not the last random draw
    saved = json.loads((tmp_path / "b" / "adapter" / "allmem_config.json").read_text())["allmem"]
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path / "b").allmem_config()
    assert (saved["window"], saved["sinks"], saved["chunk"]) == (recipe.window, recipe.sinks, recipe.chunk)

    old = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "old"), resume=True, progress=False).setup()
    assert old.step == 2
    torch.testing.assert_close(torch.tensor([r.loss for r in old.train()]), torch.tensor(tail), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "old" / "checkpoints" / "step-000004" / "random_states_0.pkl").is_file()  # then the new format


def test_a_run_saves_its_resolved_recipe_and_the_cli_prints_it_without_training(tiny_smollm_dir, tmp_path, capsys):
    from allmem.cli import main

    overrides = tiny_overrides(tiny_smollm_dir, tmp_path / "run", steps=1, **{"train.lambda_order": 0.5})
    assert main(["distill", "--recipe", "smollm2-cpu", "--print-recipe", *overrides]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # printing trains nothing
    recipe = load_recipe("smollm2-cpu", overrides)
    DistillTrainer(recipe, progress=False).setup().train()
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert saved == printed
    again = load_recipe(str(tmp_path / "run" / "recipe.yaml"))  # the file alone rebuilds the run's recipe
    assert again.to_dict() == recipe.to_dict() and again.train.lambda_order == 0.5


def test_resume_forgets_replayed_steps_and_keeps_counting_time(tiny_smollm_dir, tmp_path):
    """A run killed after step 3 (checkpoint at 2) trains step 3 again on resume: metrics.jsonl
    must hold each step once (else a card counts its tokens twice) and elapsed_s must keep
    growing across the resume (else a card's hours are those of the last segment only)."""
    first = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path), progress=False).setup()
    first.train(stop_after=3)
    path = tmp_path / "metrics.jsonl"
    before = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in before] == [1, 2, 3]
    resumed = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path), resume=True, progress=False).setup()
    assert resumed.step == 2
    resumed.train()
    after = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == before[:2]
    elapsed = [r["elapsed_s"] for r in after]
    assert elapsed == sorted(elapsed) and elapsed[2] > before[1]["elapsed_s"]


def test_run_totals_count_a_replayed_step_once_and_add_the_restarted_clock(tmp_path):
    """metrics.jsonl written before resumes forgot replayed steps: steps 1-3, killed, resumed at 2."""
    rows = [(1, 10, 5.0), (2, 20, 10.0), (3, 30, 15.0), (3, 31, 4.0), (4, 40, 8.0)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "tokens": n, "elapsed_s": e}) + "\n" for s, n, e in rows)
                    + json.dumps({"step": 4, "eval": {"allmem_ppl": 9.0}}) + "\n")
    totals = run_totals(path)
    assert totals["steps"] == 4 and totals["tokens"] == 10 + 20 + 31 + 40
    assert totals["hours"] == pytest.approx((15.0 + 8.0) / 3600)


def test_evaluation_reuses_the_teacher_and_swa_references_exactly(tiny_smollm_dir, tmp_path):
    trainer = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path, steps=6), progress=False).setup()
    first = trainer.evaluate()
    trainer.train(stop_after=2)
    cached = trainer.evaluate()
    trainer.eval_references.clear()
    fresh = trainer.evaluate()
    assert cached == pytest.approx(fresh, rel=1e-6, abs=1e-9)
    assert cached["swa_ppl"] == pytest.approx(first["swa_ppl"]) and cached["allmem_ppl"] != first["allmem_ppl"]


def test_teacher_topk_cache_skips_the_teacher(tiny_smollm_dir, tmp_path):
    trainer = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "c", steps=2,
                                         **{"train.teacher_cache": str(tmp_path / "tc"), "train.teacher_topk": 16}),
                             progress=False).setup()
    trainer.train()
    assert list((tmp_path / "tc").rglob("*.safetensors"))
    calls = []
    trainer._teacher_hidden = lambda *a: calls.append(1)  # a cached sample never calls the teacher
    trainer.step = 0
    loss, res = trainer.loss_on(trainer._micro_batch(0, 0))
    assert not calls and res.tokens > 0 and torch.isfinite(loss)


def test_two_process_cpu_run_through_accelerate_launch(tiny_smollm_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    r = tiny_recipe(tiny_smollm_dir, tmp_path / "ddp", steps=3)
    import yaml

    data = r.to_dict()
    data["train"]["betas"] = list(data["train"]["betas"])
    recipe.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "src/allmem/recipes/accelerate/cpu-2proc.yaml"), "--main_process_port", "29561",
           "-m", "allmem.cli", "distill", "--recipe", str(recipe), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in lines)
    assert (tmp_path / "ddp" / "adapter" / "adapter.safetensors").is_file()


KILLABLE_RUN = """
import sys
from allmem.distill.recipe import load_recipe
from allmem.distill.trainer import DistillTrainer

recipe, resume, stop_after = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
DistillTrainer(load_recipe(recipe), resume=resume, progress=False).setup().train(stop_after=stop_after or None)
"""


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_reproduces_the_losses(tiny_smollm_dir, tmp_path):
    """Under 2-process DDP (gloo): 4 steps straight, against 2 steps, a kill, and 2 resumed steps; the
    checkpoint holds both processes' RNG (accelerate's save_state)."""
    import yaml

    script = tmp_path / "run.py"
    script.write_text(KILLABLE_RUN)
    # torchrun, not `accelerate launch --config_file cpu-2proc.yaml`: on a CPU, accelerate's launcher
    # starts one process unless mpirun is set up; accelerate reads torchrun's ranks under ACCELERATE_USE_CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}

    def launch(out: str, resume: bool, stop_after: int) -> None:
        data = tiny_recipe(tiny_smollm_dir, tmp_path / out, steps=4).to_dict()
        data["train"]["betas"] = list(data["train"]["betas"])
        recipe = tmp_path / f"{out}.yaml"
        recipe.write_text(yaml.safe_dump(data))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               str(script), str(recipe), "resume" if resume else "new", str(stop_after)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    def logged(out: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    launch("straight", resume=False, stop_after=0)
    launch("killed", resume=False, stop_after=2)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    launch("killed", resume=True, stop_after=0)
    straight, resumed = logged("straight"), logged("killed")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([x["loss"] for x in resumed]),
                               torch.tensor([x["loss"] for x in straight]), rtol=1e-5, atol=1e-6)
    assert [x["lr"] for x in resumed] == [x["lr"] for x in straight]


@pytest.mark.real_model
def test_a_few_dozen_steps_of_the_cpu_recipe_lower_the_heldout_loss(tmp_path):
    """The smollm2-cpu recipe on the real SmolLM2, shrunk to ~350-token text and a 64-token window.

    Measured when written: held-out KL 0.3104 -> 0.3070 after 16 steps, perplexity SWA 23.69,
    AllMem 23.19, full attention 17.03 (the memory has only started to help; see docs).
    """
    recipe = load_recipe("smollm2-cpu", [
        f"train.output_dir={tmp_path}", "train.steps=16", "train.save_every=0", "train.eval_every=0",
        "train.warmup_steps=2", "train.lr=3e-3", "train.alpha_lr_mult=3", "allmem.window=64", "allmem.chunk=32",
        "randomize={window: [48, 96], sinks: [1, 4], chunk: [16, 48]}",
        "data=[{source: text, count: 24, lengths: [320, 384]}]",
        "heldout=[{source: text, count: 4, lengths: [384, 384]}]",
    ])
    trainer = DistillTrainer(recipe, progress=False).setup()
    before = trainer.evaluate()
    assert before["allmem_ppl"] == pytest.approx(before["swa_ppl"])  # alpha = 0: exactly SWA + sinks
    trainer.train()
    after = trainer.evaluate()
    print(f"held-out KL {before['kl']:.4f} -> {after['kl']:.4f}; ppl SWA {after['swa_ppl']:.2f}, "
          f"AllMem {after['allmem_ppl']:.2f}, full {after['full_ppl']:.2f}")
    assert after["kl"] < before["kl"] - 0.002
    assert after["allmem_ppl"] < after["swa_ppl"]
    trainer.eval_references.clear()  # recomputed: the frozen base did not move
    assert trainer.evaluate()["swa_ppl"] == pytest.approx(before["swa_ppl"])


def test_generate_data_writes_on_policy_samples_and_resumes(tiny_smollm_dir, tmp_path):
    from allmem.cli import main
    from allmem.distill.data import file_samples

    out = tmp_path / "onpolicy.jsonl"
    args = ["generate-data", "--model", str(tiny_smollm_dir), "--tasks", "2", "--lengths", "120", "160",
            "--out", str(out), "--max-new-tokens", "4", "--window", "32", "--sinks", "2", "--chunk", "16"]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert main(args) == 0  # rerun: nothing left to generate
    assert len(out.read_text().splitlines()) == 2
    _, tok = allmem.load_base(str(tiny_smollm_dir))
    samples = file_samples(tok, out, max_len=512)  # trainable as a file source
    assert all(sum(s.loss_mask) > 0 for s in samples)


def test_eta_heads_get_their_own_learning_rate_and_older_checkpoints_say_why_they_cannot_resume(tiny_smollm_dir, tmp_path):
    from allmem.distill.checkpoint import CheckpointMismatchError

    trainer = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "a", **{"train.eta_lr_mult": 7}),
                             progress=False).setup()
    groups = trainer.optimizer.param_groups
    gates = {id(p) for n, p in trainer.params.items() if ".eta_proj." in n}
    assert gates and {id(p) for p in groups[2]["params"]} == gates
    assert groups[2]["initial_lr"] == pytest.approx(7 * groups[0]["initial_lr"])
    assert not gates & {id(p) for g in groups[:2] for p in g["params"]}
    # a checkpoint (old format) of an optimizer from before the eta group: a clear mismatch, nothing loaded
    old = torch.optim.AdamW([{"params": list(groups[0]["params"]) + list(groups[2]["params"])},
                             {"params": list(groups[1]["params"])}], lr=1e-3)
    save_checkpoint(tmp_path / "b" / "checkpoints", 2, trainer.params, old, trainer.scheduler, {"recipe": "x"})
    with pytest.raises(CheckpointMismatchError, match="parameter groups"):
        DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path / "b"), resume=True, progress=False).setup()
    with pytest.raises(allmem.ConfigError, match="eta_lr_mult"):
        tiny_recipe(tiny_smollm_dir, tmp_path / "c", **{"train.eta_lr_mult": -1})


def test_a_fresh_centred_memory_is_calibrated_on_the_training_data(tiny_smollm_dir, tmp_path):
    trainer = DistillTrainer(tiny_recipe(tiny_smollm_dir, tmp_path, **{"allmem.centre": "true"}), progress=False).setup()
    means = [layer.self_attn.memory.feature_mean for layer in trainer._unwrapped.model.layers]
    assert all(m.abs().max() > 1e-3 for m in means)
    assert all(trainer.params[n] is p for n, p in trainer._unwrapped.named_parameters() if n.endswith("feature_mean"))


def naive_gate_loss(eta_logits, write_mask, context_mask, target_ratio):
    """write_gate_loss one row, layer and head at a time, in float64."""
    terms, logs = [], []
    for logits in eta_logits:
        for b in range(logits.shape[0]):
            needle = [t for t in range(logits.shape[1]) if write_mask[b, t] and context_mask[b, t]]
            rest = [t for t in range(logits.shape[1]) if not write_mask[b, t] and context_mask[b, t]]
            if not needle or not rest:
                continue
            for h in range(logits.shape[2]):
                eta = [math.log1p(math.exp(logits[b, t, h].item())) for t in range(logits.shape[1])]
                ratio = (sum(eta[t] for t in needle) / len(needle)) / (sum(eta[t] for t in rest) / len(rest))
                terms.append(math.log1p(math.exp(math.log(target_ratio) - math.log(ratio))))
                logs.append(math.log10(ratio))
    return sum(terms) / len(terms), logs


def test_write_gate_loss_matches_a_per_head_loop_and_trains_only_the_logits():
    from allmem.distill.losses import write_gate_loss

    torch.manual_seed(0)
    logits = [torch.randn(3, 20, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    write_mask = torch.zeros(3, 20, dtype=torch.bool)
    write_mask[0, 4:7] = True
    write_mask[1, 15:17] = True  # row 2 has no needle: it takes no part
    context_mask = torch.ones(3, 20, dtype=torch.bool)
    context_mask[:, 16:] = False  # the response: neither needle nor filler (row 1 keeps one needle token)
    loss, log10 = write_gate_loss(logits, write_mask, context_mask, 100.0)
    expected, expected_logs = naive_gate_loss(logits, write_mask, context_mask, 100.0)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert sorted(log10.tolist()) == pytest.approx(sorted(expected_logs), rel=1e-9)
    loss.backward()
    assert all(bool(l.grad[2].eq(0).all()) for l in logits)  # the needle-free row gets no gradient
    # a uniform gate: ratio 1, loss log(1 + target)
    flat, ratios = write_gate_loss([torch.zeros(1, 8, 3)], write_mask[:1, :8], torch.ones(1, 8, dtype=torch.bool), 100.0)
    assert float(flat) == pytest.approx(math.log(101.0)) and ratios.abs().max() < 1e-6


def test_recall_samples_mark_where_the_answer_sits_in_the_context():
    from allmem.distill.data import answer_in_context, task_samples

    _, tok = allmem.load_base("smollm2")
    # passkey's needle states the key twice; niah_multivalue's three values once each
    for task, copies in (("passkey", 2), ("niah_multivalue", 1)):
        (sample,) = task_samples(tok, 1, (300, 400), seed=3, split="train", tasks=(task,))
        marked = [i for i, m in enumerate(sample.write_mask) if m]
        response = [i for i, m in enumerate(sample.loss_mask) if m]
        answer = tok.decode(sample.input_ids[response[0]:response[-1] + 1]).split(".<|im_end|>")[0]
        assert marked and max(marked) < response[0]
        assert sorted(tok.decode([sample.input_ids[i] for i in marked]).split()) == sorted(answer.split(", ") * copies)
    # several needles, one asked: every stated value is marked (the gate cannot know which one will be asked)
    for task in ("niah_multikey", "kv_retrieval"):
        (sample,) = task_samples(tok, 1, (300, 400), seed=3, split="train", tasks=(task,))
        marked = tok.decode([t for t, m in zip(sample.input_ids, sample.write_mask) if m]).split()
        prompt = tok.decode(sample.input_ids[:sample.loss_mask.index(1)])
        stated = re.findall(r"(?:is: |: )(\d{6,7})\b", prompt)
        assert len(stated) >= (4 if task == "niah_multikey" else 10) and sorted(marked) == sorted(stated)
        # write_marks: answer (the masks of runs v9 and v10) marks only the asked value
        (sample,) = task_samples(tok, 1, (300, 400), seed=3, split="train", tasks=(task,), write_marks="answer")
        marked = tok.decode([t for t, m in zip(sample.input_ids, sample.write_mask) if m]).split()
        asked = tok.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m]).split(".")[0].strip()
        assert marked == [asked] and asked in stated
    # an answer the context does not spell out marks nothing; a copy inside the response does not count
    sample = chat_sample(tok, [{"role": "user", "content": "Say a number."}, {"role": "assistant", "content": "4711"}], 64)
    assert answer_in_context(tok, sample, " 4711.") is None


def test_the_write_gate_loss_makes_the_gates_single_out_the_needle(tiny_smollm_dir, tmp_path):
    data = "[{source: tasks, count: 4, lengths: [200, 300], tasks: [passkey, kv_retrieval]}]"
    ratios = {}
    for name, weight in (("off", 0.0), ("on", 1.0)):
        recipe = tiny_recipe(tiny_smollm_dir, tmp_path / name, steps=6, data=data, **{
            "train.lambda_gate": weight, "train.eta_lr_mult": 10})
        ratios[name] = [r.gate_log10_ratio for r in DistillTrainer(recipe, progress=False).setup().train()]
    assert ratios["off"] == [None] * 6  # nothing measured, nothing added to the loss
    assert ratios["on"][0] == pytest.approx(0.0, abs=1e-6)  # the heads start uniform
    assert ratios["on"][-1] > 0.3  # the needle written > 2x more than the filler after 5 updates
    with pytest.raises(allmem.ConfigError, match="gate_ratio"):
        tiny_recipe(tiny_smollm_dir, tmp_path / "bad", **{"train.gate_ratio": 1.0})


def test_the_answer_order_loss_is_logged_for_answers_and_absent_for_text(tiny_smollm_dir, tmp_path):
    recipe = tiny_recipe(tiny_smollm_dir, tmp_path / "run", steps=4, **{"train.lambda_order": 1.0, "data": (
        "[{source: tasks, count: 4, lengths: [200, 300], lambda_ce: 1.0}, {source: text, count: 2, lengths: [200, 300]}]")})
    trainer = DistillTrainer(recipe, progress=False).setup()
    task = next(s for s in trainer.train_samples if s.source.startswith("task/"))
    text = next(s for s in trainer.train_samples if s.source.startswith("text"))
    with torch.no_grad():
        with_order, on_task = trainer.loss_on([task])
        on_text = trainer.loss_on([text])[1]
        trainer.recipe.train.lambda_order = 0.0
        without = trainer.loss_on([task])[0]
        trainer.recipe.train.lambda_order = 1.0
    assert on_task.order > 0 and on_text.order is None
    assert float(with_order - without) == pytest.approx(on_task.order, rel=1e-4)
    records = [r for r in trainer.train() if r.order is not None]
    assert records and all(math.isfinite(r.order) for r in records)
    with pytest.raises(allmem.ConfigError, match="lambda_order"):
        tiny_recipe(tiny_smollm_dir, tmp_path / "bad", **{"train.lambda_order": -1})


def test_an_adapter_from_any_checkpoint_of_a_run_holds_that_steps_weights(tiny_smollm_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from allmem.cli import main

    overrides = tiny_overrides(tiny_smollm_dir, tmp_path / "run", steps=4)
    assert main(["adapter", "--recipe", "smollm2-cpu", *overrides]) == 2  # no checkpoint yet: one error line
    assert capsys.readouterr().err.startswith("error: no checkpoint")
    DistillTrainer(load_recipe("smollm2-cpu", overrides), progress=False).setup().train()
    step2 = tmp_path / "run" / "checkpoints" / "step-000002"
    assert main(["adapter", "--recipe", "smollm2-cpu", "--checkpoint", str(step2), "--out", str(tmp_path / "a2"),
                 *overrides]) == 0
    assert main(["adapter", "--recipe", "smollm2-cpu", *overrides]) == 0  # the latest: step 4
    trained = load_file(str(step2 / "trainable.safetensors"))
    model = allmem.from_pretrained(str(tmp_path / "a2"))
    half = tmp_path / "half"
    assert main(["adapter", "--recipe", "smollm2-cpu", "--checkpoint", str(step2), "--out", str(half), "--save-dtype",
                 "bfloat16", *overrides]) == 0
    assert {t.dtype for t in load_file(str(half / "adapter.safetensors")).values()} == {torch.bfloat16}
    assert all(torch.equal(p, trained[n]) for n, p in model.memory_parameters().items())
    final = allmem.from_pretrained(str(tmp_path / "run" / "adapter")).memory_parameters()
    latest = allmem.from_pretrained(str(tmp_path / "run" / "adapter-step-000004")).memory_parameters()
    assert all(torch.equal(p, final[n]) for n, p in latest.items())
    assert not all(torch.equal(p, final[n]) for n, p in model.memory_parameters().items())



def test_attention_transfer_loss_is_the_relative_squared_error_on_the_chosen_rows():
    from allmem.distill.losses import attention_transfer_loss

    torch.manual_seed(0)
    output = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 3, dtype=torch.float64)
    rows = torch.zeros(2, 5, dtype=torch.bool)
    rows[0, 1], rows[1, 3], rows[1, 4] = True, True, True
    picked = [(0, 1), (1, 3), (1, 4)]
    num = sum(float(((output[b, t] - target[b, t]) ** 2).sum()) for b, t in picked)
    den = sum(float((target[b, t] ** 2).sum()) for b, t in picked)
    loss = attention_transfer_loss(output, target, rows)
    assert float(loss) == pytest.approx(num / den, rel=1e-12)
    loss.backward()
    assert bool(output.grad[0, 0].eq(0).all()) and not bool(output.grad[0, 1].eq(0).all())
    assert float(attention_transfer_loss(target, target, rows)) == 0.0
    assert float(attention_transfer_loss(output, target, torch.zeros_like(rows))) == 0.0


def test_attention_transfer_loss_over_the_window_error():
    """transfer_norm window: the denominator is the window attention's own squared error."""
    from allmem.distill.losses import attention_transfer_loss

    torch.manual_seed(1)
    output, target, window = (torch.randn(2, 4, 3, dtype=torch.float64) for _ in range(3))
    rows = torch.tensor([[True, False, True, False], [False, False, True, True]])
    picked = [(0, 0), (0, 2), (1, 2), (1, 3)]
    num = sum(float(((output[b, t] - target[b, t]) ** 2).sum()) for b, t in picked)
    den = sum(float(((window[b, t] - target[b, t]) ** 2).sum()) for b, t in picked)
    assert float(attention_transfer_loss(output, target, rows, window)) == pytest.approx(num / den, rel=1e-12)
    assert float(attention_transfer_loss(window, target, rows, window)) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ConfigError, match="transfer_norm"):
        tiny_recipe("x", "out", **{"train.transfer_norm": "teacher"})


def test_the_window_normalised_transfer_error_uses_each_layers_own_window(tiny_smollm_dir, tmp_path):
    """The trainer takes a layer's window attention as its output less alpha * memory; recomputed
    here by calling every layer again on the same inputs with its alpha at zero."""
    from allmem.distill.losses import attention_transfer_loss

    recipe = tiny_recipe(tiny_smollm_dir, tmp_path / "run", **{"train.lambda_transfer": 1.0,
                                                               "train.transfer_norm": "window"})
    trainer = DistillTrainer(recipe, progress=False).setup()
    model = trainer._unwrapped
    model.set_runtime(window=32, sinks=2, chunk=16)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.alpha.fill_(0.3 + 0.05 * i)
    sample = next(s for s in trainer.train_samples if s.source.startswith("task"))  # scored rows: the answer
    calls = []

    def keep(module, args, kwargs, output):
        calls.append((module, (args[0] if args else kwargs["hidden_states"]).detach(), kwargs["allmem_segment"],
                      output[0].detach()))

    hooks = [layer.self_attn.register_forward_hook(keep, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        got = trainer.loss_on([sample])[1].transfer_error
    for hook in hooks:
        hook.remove()
    ids, attn, mask = collate([sample], trainer.pad_id)
    expected = []
    with torch.no_grad():
        for module, hidden, segment, output in calls[: len(model.model.layers)]:
            target = module.teacher_attention(hidden, segment)
            with model.memory_disabled():
                window = module(hidden, allmem_segment=segment)[0]
            assert not torch.allclose(window, output)  # the memory adds something: the test can tell them apart
            expected.append(sum(float(attention_transfer_loss(output, target, rows.bool(), window))
                                for rows in (attn, mask)))
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_needle_transfer_loss_against_a_loop():
    """Pooled over layers: sum ||change of output - change of target||^2 / sum ||change of target||^2."""
    from allmem.distill.losses import needle_transfer_loss

    torch.manual_seed(2)
    shape = (1, 6, 4)
    outs, tgts, outs_cf, tgts_cf = ([torch.randn(shape, dtype=torch.float64) for _ in range(3)] for _ in range(4))
    rows = torch.tensor([[False, False, False, True, True, False]])
    num = den = 0.0
    for o, t, oc, tc in zip(outs, tgts, outs_cf, tgts_cf):
        for j in (3, 4):
            num += float((((o[0, j] - oc[0, j]) - (t[0, j] - tc[0, j])) ** 2).sum())
            den += float(((t[0, j] - tc[0, j]) ** 2).sum())
    assert float(needle_transfer_loss(outs, tgts, outs_cf, tgts_cf, rows)) == pytest.approx(num / den, rel=1e-12)
    # a layer that does not change with the code scores 1 (SWA + sinks); one that changes as the target does, 0
    assert float(needle_transfer_loss(outs, tgts, outs, tgts_cf, rows)) == pytest.approx(1.0, rel=1e-12)
    changed = [o + (t - tc) for o, t, tc in zip(outs, tgts, tgts_cf)]
    assert float(needle_transfer_loss(changed, tgts, outs, tgts_cf, rows)) == pytest.approx(0.0, abs=1e-12)


def test_counterfactual_ids_change_only_the_needles_digits(tiny_smollm_dir):
    from transformers import AutoTokenizer

    from allmem.distill.data import Sample, counterfactual_ids, digit_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_smollm_dir)
    digits = digit_token_ids(tok)
    assert sorted(digits.values()) == list(range(10))
    ids = tok("code 4071 then 4071 end", add_special_tokens=False).input_ids
    by_digit = {d: t for t, d in digits.items()}
    where = [i for i, t in enumerate(ids) if t in digits]
    assert len(where) == 8  # single-digit tokens
    mask = [0] * len(ids)
    for i in where[:4]:  # only the first occurrence is the needle; the second stands for the scored answer
        mask[i] = 1
    sample = Sample(ids, [0] * len(ids), "task/passkey", write_mask=mask)
    counter = counterfactual_ids(sample, digits)
    assert [counter[i] for i in where[:4]] == [by_digit[d] for d in (9, 5, 2, 6)]
    assert [c for i, c in enumerate(counter) if i not in where[:4]] == [t for i, t in enumerate(ids) if i not in where[:4]]
    words = tok("the word is apple", add_special_tokens=False).input_ids
    assert counterfactual_ids(Sample(words, [0] * len(words), "t", write_mask=[1] * len(words)), digits) is None
    assert counterfactual_ids(Sample(ids, [0] * len(ids), "t"), digits) is None


def test_the_needle_error_of_a_recall_step_is_the_layers_change_with_the_code(tiny_smollm_dir, tmp_path):
    """train.lambda_needle: the trainer runs the counterfactual (another code in the needle) and logs the
    pooled needle-specific error; recomputed here from two hooked forwards of the prompt and its
    counterfactual. Text samples and word answers add nothing."""
    from allmem.distill.data import counterfactual_ids, digit_token_ids
    from allmem.distill.losses import needle_transfer_loss

    recipe = tiny_recipe(tiny_smollm_dir, tmp_path / "run", steps=6, **{
        "train.lambda_needle": 1.0, "train.lambda_gate": 1.0,
        "data": "[{source: tasks, count: 6, lengths: [200, 300], tasks: [passkey]}, {source: text, count: 3, lengths: [200, 300]}]"})
    trainer = DistillTrainer(recipe, progress=False).setup()
    model = trainer._unwrapped
    model.set_runtime(window=32, sinks=2, chunk=16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.alpha.fill_(0.5)
    sample = next(s for s in trainer.train_samples if s.source == "task/passkey")
    counter = counterfactual_ids(sample, digit_token_ids(trainer.tokenizer))
    assert counter is not None and counter != sample.input_ids
    with torch.no_grad():
        got = trainer.loss_on([sample])[1].needle_error
    captured = {}
    for name, ids in (("prompt", sample.input_ids), ("counter", counter)):
        outs = []

        def keep(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            outs.append((output[0], module.teacher_attention(hidden, kwargs["allmem_segment"])))

        hooks = [layer.self_attn.register_forward_hook(keep, with_kwargs=True) for layer in model.model.layers]
        with torch.no_grad():
            model(torch.tensor([ids]), use_cache=False)
        for hook in hooks:
            hook.remove()
        captured[name] = outs
    scored = torch.tensor([sample.loss_mask], dtype=torch.bool)
    expected = needle_transfer_loss([o for o, _ in captured["prompt"]], [t for _, t in captured["prompt"]],
                                    [o for o, _ in captured["counter"]], [t for _, t in captured["counter"]], scored)
    assert 0 < got and got == pytest.approx(float(expected), rel=1e-4)
    text = next(s for s in trainer.train_samples if s.source.startswith("text"))
    with torch.no_grad():
        assert trainer.loss_on([text])[1].needle_error is None
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recall_steps = [r for r in logged if r.get("source") == "task/passkey"]
    assert recall_steps and all(math.isfinite(r["needle_error"]) for r in recall_steps)
    assert all("needle_error" not in r for r in logged if r.get("source", "").startswith("text"))


def test_the_attention_transfer_loss_moves_the_layers_toward_full_attention(tiny_smollm_dir, tmp_path):
    trainers, errors = {}, {}
    for name, weight in (("off", 0.0), ("on", 3.0)):
        recipe = tiny_recipe(tiny_smollm_dir, tmp_path / name, steps=8, **{"train.lambda_transfer": weight, "train.lr": 1e-2})
        trainers[name] = DistillTrainer(recipe, progress=False).setup()
        errors[name] = [r.transfer_error for r in trainers[name].train()]
        logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert ("transfer_error" in logged[-1]) == (weight > 0)
    assert errors["off"] == [None] * 8  # nothing computed, nothing added to the loss
    assert all(math.isfinite(e) and e > 0 for e in errors["on"])
    # the same held-out sample, the same window: trained with the loss, the layers sit closer to full attention
    sample = trainers["on"].heldout_samples[0]
    measured = {}
    for name, trainer in trainers.items():
        trainer.recipe.train.lambda_transfer = 1.0
        trainer._unwrapped.set_runtime(window=32, sinks=2, chunk=16)
        with torch.no_grad():
            measured[name] = trainer.loss_on([sample])[1].transfer_error
    assert measured["on"] < 0.95 * measured["off"], (measured, errors["on"])
