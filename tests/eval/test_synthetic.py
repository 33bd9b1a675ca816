"""The synthetic suite: RULER scoring rules, generators (length, depth, answers), the runner."""

from __future__ import annotations

import json
import random
import re

import pytest
from transformers import AutoTokenizer

from allmem.distill.tasks import TASKS, make_example
from allmem.eval import synthetic
from allmem.eval.ruler import (
    DEPTH_TASKS,
    NIAH_CONFIGS,
    RULER_TASKS,
    SYNTHETIC_TASKS,
    count_tokens,
    make_synthetic_example,
)
from allmem.eval.synthetic import (
    Cell,
    comparison_markdown,
    passkey_digits,
    passkey_score,
    plan_cells,
    postprocess_pred,
    run_synthetic,
    sample_score,
    string_match_all,
    string_match_part,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_smollm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_smollm_dir)
    tok.model_max_length = 10**12
    return tok


# ----------------------------------------------------------------------------- scoring rules


def test_string_match_all_hand_cases():
    # fraction of gold strings found, case-insensitive, averaged over samples, x 100
    preds = ["The numbers are 123 and 456.", "only 123 here", "NOTHING", "Apple-Pie 7"]
    refs = [["123", "456"], ["123", "456"], ["123"], ["apple-pie"]]
    assert string_match_all(preds, refs) == round(100 * (1 + 0.5 + 0 + 1) / 4, 2) == 62.5
    assert string_match_all(["a b c"], [["A", "B", "C", "D"]]) == 75.0
    assert string_match_all([], []) == 0.0


def test_string_match_part_hand_cases():
    # 1 if any gold string is found, averaged over samples
    preds = ["only 123 here", "nothing", "456"]
    refs = [["123", "456"], ["123"], ["999", "456"]]
    assert string_match_part(preds, refs) == round(100 * 2 / 3, 2) == 66.67
    with pytest.raises(ValueError):
        string_match_part(["x"], [["a"], ["b"]])  # lengths must agree


def test_postprocess_and_passkey_rules():
    assert postprocess_pred("  12\x0034\tfoo \n") == "12\n34\nfoo"
    assert passkey_score(" 41190. Remember it.", "41190") == 1.0
    assert passkey_score("The pass key is 41190", "41190") == 1.0
    assert passkey_score(" 4119 0", "41190") == 0.0  # only the first integer counts
    assert passkey_score(" 12 41190", "41190") == 0.0
    assert passkey_score("no digits", "41190") == 0.0
    assert passkey_score("041190", "41190") == 1.0  # compared as integers
    # digits in place: position by position against the first integer, over the longer of the two
    assert passkey_digits(" 89836.", "89836") == 1.0
    assert passkey_digits("89636", "89836") == 0.8
    assert passkey_digits("8936", "89836") == 0.4  # a dropped digit shifts the rest
    assert passkey_digits("898360", "89836") == pytest.approx(5 / 6)
    assert passkey_digits("no digits", "89836") == 0.0
    assert passkey_digits("12 89836", "89836") == 0.0
    assert passkey_digits("0089836", "89836") == 1.0
    assert sample_score("string_match_all", "FOO-bar and 12", ["foo-bar", "13"]) == 0.5
    assert sample_score("string_match_part", "FOO-bar and 12", ["foo-bar", "13"]) == 1.0
    assert sample_score("passkey", "\x01 777", ["777"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        sample_score("bleu", "x", ["x"])


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_generators_hit_length_and_contain_answers(task, tokenizer):
    for length in (1024, 1900) if task in ("passkey", "niah_single_2", "fwe") else (1500,):
        ex = make_synthetic_example(task, tokenizer, length, random.Random(f"{task}{length}"), depth=0.5)
        assert count_tokens(tokenizer, ex.prompt) == ex.length
        assert 0.95 * length <= ex.length <= length, (task, length, ex.length)
        assert ex.prompt.endswith(ex.answer_prefix) and ex.answer_prefix
        assert ex.outputs and all(o in ex.input for o in ex.outputs if task != "fwe")
        assert ex.max_new_tokens > 0 and ex.metric in ("passkey", "string_match_all")
    if task == "fwe":  # the three most frequent coded words (after the "..." noise)
        words = re.findall(r"\b[a-z]{6}\b", ex.input.split("coded words. ", 1)[1].split("\nQuestion")[0])
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts, key=lambda w: -counts[w])[:3]
        assert set(top) == set(ex.outputs)
    if task == "cwe":  # the ten common words appear more often than any other
        context = ex.input.rsplit("Below is a numbered list", 1)[1]
        words = re.findall(r"\d+\. ([a-z-]+)", context)
        rare = max(words.count(w) for w in set(words) - set(ex.outputs))
        assert min(words.count(w) for w in ex.outputs) > rare


def _needle_offset(task: str, ex) -> tuple[int, int, int]:
    """(needle start, haystack start, haystack end) in characters of ex.input."""
    if task == "passkey":
        needle = f"The pass key is {ex.outputs[0]}."
        start = ex.input.index("\n") + 1
        end = ex.input.rindex("\nWhat is the pass key?")
    elif task == "vt":
        needle = f"VAR {ex.outputs[0]} = "
        body = ex.input.rindex("Memorize and track")
        start = ex.input.index("\n\n", body) + 2
        end = ex.input.rindex("\nQuestion:")
    else:
        value = ex.outputs[0]
        needle = f"is: {value}."
        start = ex.input.index("\n") + 1
        end = ex.input.rindex("\nWhat ")
    return ex.input.index(needle), start, end


@pytest.mark.parametrize("task", DEPTH_TASKS)
def test_needles_sit_at_the_requested_depth(task, tokenizer):
    for depth in (0.0, 0.3, 0.7, 1.0):
        ex = make_synthetic_example(task, tokenizer, 1200, random.Random(7), depth=depth)
        where, start, end = _needle_offset(task, ex)
        measured = (where - start) / (end - start)
        assert abs(measured - depth) < 0.06, (task, depth, measured)
        assert ex.depth == depth


def test_distractors_and_queries(tokenizer):
    rng = random.Random(3)
    ex = make_synthetic_example("niah_multikey_1", tokenizer, 1500, rng, depth=0.2)
    assert ex.input.count("One of the special magic numbers for") == 4  # 3 distractor needles
    assert len(ex.outputs) == 1 and ex.meta["query"] == ex.meta["keys"][0]
    ex = make_synthetic_example("niah_multikey_2", tokenizer, 1500, rng, depth=0.2)
    assert ex.input.count("One of the special magic numbers for") > 15  # a haystack of needles
    ex = make_synthetic_example("niah_multikey_3", tokenizer, 1500, rng, depth=0.2)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", ex.outputs[0])
    ex = make_synthetic_example("niah_multivalue", tokenizer, 1500, rng)
    assert len(ex.outputs) == 4 and "What are all the special magic numbers for" in ex.input
    ex = make_synthetic_example("niah_multiquery", tokenizer, 1500, rng)
    assert len(ex.outputs) == 4 and ", and " in ex.meta["query"]
    ex = make_synthetic_example("niah_single_1", tokenizer, 1000, rng)
    assert ex.input.startswith("A special magic number is hidden") and ex.answer_prefix.endswith("is")
    assert "The grass is green." in ex.input
    ex = make_synthetic_example("vt", tokenizer, 1200, rng)
    assert len(ex.outputs) == 5 and "5 variables are assgined the value" in ex.answer_prefix


def test_generators_are_deterministic_and_checked(tokenizer):
    a = make_synthetic_example("niah_single_2", tokenizer, 1024, random.Random(11), depth=0.4)
    b = make_synthetic_example("niah_single_2", tokenizer, 1024, random.Random(11), depth=0.4)
    assert a.prompt == b.prompt and a.outputs == b.outputs
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_synthetic_example("qa_1", tokenizer, 1024, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        make_synthetic_example("passkey", tokenizer, 1024, random.Random(0), depth=1.5)
    with pytest.raises(ValueError, match="longer length"):
        make_synthetic_example("cwe", tokenizer, 300, random.Random(0))


def test_training_tasks_unchanged(tokenizer):
    # the distillation corpus keeps its API: TASKS and make_example(task, tokenizer, length, rng, ...)
    assert TASKS == ("passkey", "niah_multikey", "variable_tracking", "next_sentence")
    assert set(RULER_TASKS) >= set(NIAH_CONFIGS) and "passkey" not in RULER_TASKS
    ex = make_example("passkey", tokenizer, 400, random.Random(0), depth=0.5, split="train", haystack="auto")
    assert ex.answer.strip(" .") in ex.context


# ----------------------------------------------------------------------------- runner


class OracleSystem:
    """Answers from the prompt itself (finds the gold strings), counting calls; no model."""

    name = "oracle"

    def __init__(self, tokenizer, wrong_tasks=()):
        self.tokenizer, self.calls, self.wrong_tasks = tokenizer, [], set(wrong_tasks)

    def format_chat(self, text):
        return f"<user>{text}</user>"

    def generate(self, prompt, max_new_tokens, chat=False):
        self.calls.append(prompt)
        if "pass key" in prompt and "passkey" not in self.wrong_tasks:
            return " " + re.search(r"The pass key is (\d+)\. Remember", prompt).group(1) + ". Remember it."
        if "special magic" in prompt and "niah_single_1" not in self.wrong_tasks:
            key = re.search(r"special magic number for (\S+) mentioned", prompt).group(1)
            return " " + re.search(rf"for {re.escape(key)} is: (\d+)\.", prompt).group(1)
        return " I do not know."


def test_runner_scores_resumes_and_refuses_other_settings(tmp_path, tokenizer):
    system = OracleSystem(tokenizer, wrong_tasks={"niah_single_1"})
    args = (["passkey", "niah_single_1", "fwe"], [600, 900], [0.0, 1.0], 2, tmp_path / "run")
    result = run_synthetic(system, *args, chat=False, progress=False)
    cells = plan_cells(*args[:4])
    assert len(system.calls) == len(cells) == 3 * 2 * 4  # fwe: no depth, 2 x 2 samples per length
    assert result.scores["passkey"] == {600: 100.0, 900: 100.0}
    assert result.scores["niah_single_1"] == {600: 0.0, 900: 0.0}
    assert result.by_depth["passkey"]["0.00"] == {600: 100.0, 900: 100.0}
    assert result.counts["fwe"] == {600: 4, 900: 4} and "-" in result.by_depth["fwe"]
    md = (tmp_path / "run" / "scores.md").read_text()
    assert "| passkey | 100.00 | 100.00 |" in md and "passkey by needle depth" in md
    saved = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert saved["scores"]["passkey"]["600"] == 100.0
    # the oracle answers every key exactly: all digits in place, and only passkey gets the column
    assert result.digits == {"passkey": {600: 100.0, 900: 100.0}} and saved["digits"]["passkey"]["900"] == 100.0
    assert "Key digits in place" in md and "Key digits in place" in comparison_markdown([result])
    # one wrong digit in every key: exact match drops to 0, the digits score to (n - 1) / n
    rescored = tmp_path / "rescored"
    rescored.mkdir()
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    expected = {600: [], 900: []}
    for r in records:
        if r["task"] == "passkey":
            key = r["outputs"][0]
            r["pred"] = " " + key[:-1] + str((int(key[-1]) + 1) % 10)
            expected[r["length"]].append((len(key) - 1) / len(key))
    (rescored / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    off_by_one = synthetic.score_synthetic(rescored, "oracle")
    assert off_by_one.scores["passkey"] == {600: 0.0, 900: 0.0}
    assert off_by_one.digits["passkey"] == {n: round(100 * sum(v) / len(v), 2) for n, v in expected.items()}

    # a rerun generates nothing; an interrupted run (torn last line, lost records) resumes
    again = run_synthetic(system, *args, chat=False, progress=False)
    assert len(system.calls) == len(cells) and again.scores == result.scores
    path = tmp_path / "run" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])
    system.calls.clear()
    resumed = run_synthetic(system, *args, chat=False, progress=False)
    assert len(system.calls) == 3 and resumed.scores == result.scores
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted(c.id for c in cells)

    # the same prompts every time: ids name the cell, seeds derive from ids
    prompts = []
    for folder in ("a", "b"):
        system.calls.clear()
        run_synthetic(system, ["passkey", "vt"], [600], [0.0, 0.5], 1, tmp_path / folder, chat=False, progress=False)
        prompts.append(list(system.calls))
    assert prompts[0] == prompts[1] and len(set(prompts[0])) == 4
    with pytest.raises(ValueError, match="other settings"):
        run_synthetic(system, *args, chat=True, progress=False)
    # more tasks or lengths in the same folder are fine: they are new cells
    system.calls.clear()
    more = run_synthetic(system, ["passkey", "niah_single_1", "fwe", "vt"], [600, 900], [0.0, 1.0], 2,
                         tmp_path / "run", chat=False, progress=False)
    assert len(system.calls) == 8 and set(more.scores) == {"passkey", "niah_single_1", "vt", "fwe"}


def test_runner_chat_prompt_puts_answer_prefix_after_template(tmp_path, tokenizer):
    system = OracleSystem(tokenizer)
    run_synthetic(system, ["passkey"], [500], [0.5], 1, tmp_path, chat=True, progress=False, max_new_tokens=5)
    prompt = system.calls[0]
    assert prompt.startswith("<user>There is an important info") and prompt.endswith("</user>The pass key is")
    settings = json.loads((tmp_path / "run_settings.json").read_text())
    assert settings["max_new_tokens"] == 5 and settings["chat"] is True
    record = json.loads((tmp_path / "predictions.jsonl").read_text())
    assert record["max_new_tokens"] == 5 and record["prompt_tokens"] <= 500


def test_plan_cells_validates():
    assert Cell("passkey", 1024, 0.5, 1).id == "passkey|1024|0.50|1"
    with pytest.raises(ValueError, match="unknown synthetic task"):
        plan_cells(["nope"], [1024], [0.5], 1)
    with pytest.raises(ValueError, match="depths"):
        plan_cells(["passkey"], [1024], [2.0], 1)
    assert synthetic.depth_label(None) == "-"
