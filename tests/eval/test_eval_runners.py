"""End-to-end runs of the three benchmark runners on tiny fixture files, with a scripted model.

The fixture files (tests/eval/fixtures) are in the official formats. Every expected score is
worked out by hand in the comments, from the metric definitions (see test_eval_metrics.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allmem.eval import infinitebench, longbench, lveval
from allmem.eval.common import DataFormatError
from eval_fakes import FIXTURES, CharTokenizer, ScriptedModel, chat

BIG = 10**6  # a prompt budget no fixture reaches

# ----------------------------------------------------------------------------- LongBench

LB_SUBSETS = ("hotpotqa", "triviaqa", "dureader")
LB_ANSWERS = {
    "[hp-1]": "Paris",  # exact: 1
    "[hp-2]": "President Obama",  # vs "Barack Obama" 1/2, vs "Obama" 2/3: max 2/3
    "[hp-3]": "I cannot tell",  # 0
    "[tq-1]": "\nEverest\nQuestion: next one",  # first line "Everest": 1
    "[tq-2]": "The year 1970\n1969",  # first line "year 1970" vs "1969": 0
    "[dr-1]": "北京是首都",  # ROUGE-L on jieba words vs "首都是北京": 1/3
    "[dr-2]": "",  # empty prediction: rouge raises -> 0
}


def run_lb(out_dir: Path, model: ScriptedModel, data_dir: Path = FIXTURES / "longbench", **kwargs):
    kwargs.setdefault("max_length", BIG)
    kwargs.setdefault("chat_template", chat)
    return longbench.run_longbench(
        data_dir, out_dir, model, CharTokenizer(), subsets=LB_SUBSETS, **kwargs
    )


def test_longbench_scores(tmp_path: Path):
    model = ScriptedModel(LB_ANSWERS)
    result = run_lb(tmp_path / "run", model)
    # hotpotqa: (1 + 2/3 + 0) / 3 = 55.555... -> 55.56
    # triviaqa: (1 + 0) / 2 -> 50.0  (without the first-line rule tq-2 would score 0.5)
    # dureader: (1/3 + 0) / 2 = 16.666... -> 16.67
    assert result.scores == {"hotpotqa": 55.56, "triviaqa": 50.0, "dureader": 16.67}
    # paper-style average of the subset scores: (55.56 + 50 + 16.67) / 3 = 40.743... -> 40.74
    assert result.average == 40.74
    assert result.counts == {"hotpotqa": 3, "triviaqa": 2, "dureader": 2}

    saved = json.loads((tmp_path / "run" / "scores.json").read_text(encoding="utf-8"))
    assert saved["scores"] == result.scores and saved["average"] == 40.74
    table = (tmp_path / "run" / "scores.md").read_text(encoding="utf-8")
    assert "| hotpotqa | 55.56 |" in table and "| average | 40.74 |" in table

    # official pred.py record layout, plus the id used for resuming
    first = json.loads(
        (tmp_path / "run" / "hotpotqa.jsonl").read_text(encoding="utf-8").splitlines()[0]
    )
    assert first == {
        "id": "hp-1",
        "pred": "Paris",
        "answers": ["Paris"],
        "all_classes": None,
        "length": 7,
    }


def test_longbench_prompts_budgets_and_chat_rule(tmp_path: Path):
    model = ScriptedModel(LB_ANSWERS)
    run_lb(tmp_path / "run", model)
    # official dataset2maxlen
    assert model.budget_for("[hp-1]") == 32
    assert model.budget_for("[tq-1]") == 32
    assert model.budget_for("[dr-1]") == 128
    # the chat template wraps hotpotqa and dureader, never triviaqa (few-shot continuation)
    expected = longbench.DATASET2PROMPT["hotpotqa"].format(
        context="Passage 1:\nParis is the capital of France.",
        input="[hp-1] What is the capital of France?",
    )
    assert model.prompt_for("[hp-1]") == chat(expected)
    assert model.prompt_for("[dr-1]").startswith("<user>请基于给定的文章回答下述问题。")
    assert model.prompt_for("[tq-1]").startswith("Answer the question based on the given passage.")


def test_longbench_middle_truncation(tmp_path: Path):
    model = ScriptedModel({})
    samples = longbench.load_longbench(FIXTURES / "longbench", "hotpotqa")
    full = longbench.DATASET2PROMPT["hotpotqa"].format(
        context=samples[0].fields["context"], input=samples[0].fields["input"]
    )
    # one token per character: keep the first 50 and the last 50 characters, then the chat
    prompt = longbench.build_prompt(samples[0], "hotpotqa", CharTokenizer(), 100, chat)
    assert prompt == chat(full[:50] + full[-50:])
    # triviaqa is truncated the same way but not wrapped
    trivia = longbench.load_longbench(FIXTURES / "longbench", "triviaqa")[0]
    full = longbench.DATASET2PROMPT["triviaqa"].format(
        context=trivia.fields["context"], input=trivia.fields["input"]
    )
    assert (
        longbench.build_prompt(trivia, "triviaqa", CharTokenizer(), 40, chat)
        == full[:20] + full[-20:]
    )
    assert model.calls == []


def test_longbench_resumes_without_generating_again(tmp_path: Path):
    first = ScriptedModel(LB_ANSWERS)
    result = run_lb(tmp_path / "run", first)
    assert len(first.calls) == 7
    second = ScriptedModel({})  # would answer garbage if it were asked anything
    again = run_lb(tmp_path / "run", second)
    assert second.calls == []
    assert again.scores == result.scores


def test_longbench_resumes_after_an_interruption(tmp_path: Path):
    class Interrupted(Exception):
        pass

    answers = ScriptedModel(LB_ANSWERS)

    def dies_on_hp3(prompt: str, max_new_tokens: int) -> str:
        if "[hp-3]" in prompt:
            raise Interrupted
        return answers(prompt, max_new_tokens)

    with pytest.raises(Interrupted):
        run_lb(tmp_path / "run", dies_on_hp3)
    assert len(answers.calls) == 2  # hp-1 and hp-2 were saved before the crash
    resumed = ScriptedModel(LB_ANSWERS)
    result = run_lb(tmp_path / "run", resumed)
    assert len(resumed.calls) == 5  # hp-3, 2 triviaqa, 2 dureader
    assert result.scores == {"hotpotqa": 55.56, "triviaqa": 50.0, "dureader": 16.67}


def test_longbench_limit_scores_only_the_samples_asked_for(tmp_path: Path):
    run_lb(tmp_path / "run", ScriptedModel(LB_ANSWERS))
    model = ScriptedModel({})
    result = run_lb(tmp_path / "run", model, limit=1)
    assert model.calls == []
    # first sample of each subset: hp-1 -> 1, tq-1 -> 1, dr-1 -> 1/3 (33.333... -> 33.33)
    assert result.scores == {"hotpotqa": 100.0, "triviaqa": 100.0, "dureader": 33.33}
    assert result.counts == {"hotpotqa": 1, "triviaqa": 1, "dureader": 1}
    # scoring the folder on its own takes every prediction in it
    assert longbench.score_longbench(tmp_path / "run", LB_SUBSETS).scores["hotpotqa"] == 55.56


def test_longbench_refuses_to_mix_settings(tmp_path: Path):
    run_lb(tmp_path / "run", ScriptedModel(LB_ANSWERS))
    with pytest.raises(ValueError, match="other settings"):
        run_lb(tmp_path / "run", ScriptedModel(LB_ANSWERS), max_length=1000)


def test_longbench_scorer_classification_and_first_line():
    classes = ["Location", "Person", "Number"]
    # trec: only the first line counts. "Person\nLocation" -> "Person": 0; "\nLocation" -> 1
    # (100 * 1/2 = 50.0)
    assert (
        longbench.scorer(
            "trec", ["Person\nLocation", "\nLocation"], [["Location"], ["Location"]], classes
        )
        == 50.0
    )


def test_longbench_missing_file_and_field(tmp_path: Path, data_copy):
    data = data_copy("longbench")
    (data / "triviaqa.jsonl").unlink()
    model = ScriptedModel(LB_ANSWERS)
    with pytest.raises(
        FileNotFoundError,
        match=r"LongBench file for subset 'triviaqa' not found: .*triviaqa\.jsonl",
    ):
        run_lb(tmp_path / "run", model, data_dir=data)

    lines = (FIXTURES / "longbench" / "triviaqa.jsonl").read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[1])
    del broken["answers"]
    (data / "triviaqa.jsonl").write_text(
        lines[0] + "\n" + json.dumps(broken) + "\n", encoding="utf-8"
    )
    with pytest.raises(DataFormatError, match=r"triviaqa\.jsonl, line 2: missing field 'answers'"):
        run_lb(tmp_path / "run", model, data_dir=data)
    # every file is checked before the first generation: nothing ran, nothing was written
    assert model.calls == []
    assert not (tmp_path / "run" / "hotpotqa.jsonl").exists()


def test_longbench_classification_needs_all_classes(tmp_path: Path):
    path = tmp_path / "trec.jsonl"
    path.write_text(
        json.dumps({"_id": "a", "input": "q", "context": "c", "answers": ["x"]}) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataFormatError, match=r"line 1: missing field 'all_classes'"):
        longbench.load_longbench(tmp_path, "trec")


def test_longbench_unknown_subset():
    with pytest.raises(ValueError, match="unknown LongBench subset 'nope'"):
        longbench.load_longbench(FIXTURES / "longbench", "nope")


# ----------------------------------------------------------------------------- InfiniteBench

IB_ANSWERS = {
    "[ib-e0]": "Alice.",  # [alice] vs [alice]: 1
    "[ib-e1]": "A rabbit ran",  # [rabbit, ran] vs [white, rabbit] 1/2, vs [rabbit] 2/3: 2/3
    "[ib-c0]": "北京。",  # characters [北, 京] vs [北, 京, 市]: 0.8
    "[ib-c1]": "李白杜甫",  # [李, 白, 杜, 甫] vs [李, 白]: P 1/2, R 1 -> 2/3
}


def test_infinitebench_scores_and_resume(tmp_path: Path):
    model = ScriptedModel(IB_ANSWERS)
    result = infinitebench.run_infinitebench(
        FIXTURES / "infinitebench", tmp_path / "run", model, CharTokenizer()
    )
    # eng: (1 + 2/3) / 2 = 83.333... -> 83.33 ; chn: (0.8 + 2/3) / 2 = 73.333... -> 73.33
    assert result.scores == {"longbook_qa_eng": 83.33, "longbook_qa_chn": 73.33}
    assert result.average == 78.33  # (83.33 + 73.33) / 2
    assert {budget for _, budget in model.calls} == {40}
    # no chat template by default (the official open-model path has none)
    assert model.prompt_for("[ib-e0]") == (
        "Read the book and answer the question. Be very concise in your answer.\n\n"
        "Alice fell down the rabbit hole.\n\nQuestion: [ib-e0] Who fell down the hole?\nAnswer:"
    )
    assert (
        model.prompt_for("[ib-c0]")
        == "阅读以下书籍然后回答问题。\n\n他住在北京市。\n\n问题：[ib-c0]他住在哪里？\n答案："
    )
    record = json.loads(
        (tmp_path / "run" / "longbook_qa_eng.jsonl").read_text(encoding="utf-8").splitlines()[0]
    )
    assert record == {"id": "0", "pred": "Alice.", "label": ["Alice"]}

    again = ScriptedModel({})
    assert (
        infinitebench.run_infinitebench(
            FIXTURES / "infinitebench", tmp_path / "run", again, CharTokenizer()
        ).scores
        == result.scores
    )
    assert again.calls == []


def test_infinitebench_truncation_keeps_first_and_last_halves():
    sample = infinitebench.load_infinitebench(FIXTURES / "infinitebench", "longbook_qa_eng")[0]
    full = infinitebench.TEMPLATES["longbook_qa_eng"].format(
        context=sample.fields["context"], question=sample.fields["input"]
    )
    assert (
        infinitebench.build_prompt(sample, "longbook_qa_eng", CharTokenizer(), 64)
        == full[:32] + full[-32:]
    )
    assert infinitebench.build_prompt(sample, "longbook_qa_eng", CharTokenizer(), 64, chat) == chat(
        full[:32] + full[-32:]
    )
    assert infinitebench.TRUNCATE_LEN == 131072


def test_infinitebench_missing_field(tmp_path: Path, data_copy):
    data = data_copy("infinitebench")
    path = data / "longbook_qa_chn.jsonl"
    record = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    del record["input"]
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(
        DataFormatError, match=r"longbook_qa_chn\.jsonl, line 1: missing field 'input'"
    ):
        infinitebench.run_infinitebench(data, tmp_path / "run", ScriptedModel({}), CharTokenizer())
    with pytest.raises(
        FileNotFoundError, match=r"InfiniteBench file for subset 'longbook_qa_eng' not found"
    ):
        infinitebench.load_infinitebench(tmp_path, "longbook_qa_eng")


# ----------------------------------------------------------------------------- LV-Eval

LV_SUBSETS = ("hotpotwikiqa_mixup", "cmrc_mixup", "dureader_mixup", "factrecall_en")
LV_ANSWERS = {
    "[lv-w1]": "The coach was Stoutland",  # keyword recall 1/2 passes; F1 0.4
    "[lv-w2]": "it was in the year of his birth",  # keyword "1990" missed: 0 (plain F1 0.4)
    "[lv-c1]": "首都是北京",  # keywords = answer; recall 2/5 = 0.4 passes; F1 0.75
    "[lv-c2]": "首都",  # answers[0] only: recall 1/5 < 0.4 -> 0 (answers[1] == "首都" ignored)
    "[lv-d1]": "北京是首都",  # blacklist ROUGE-L vs "首都是北京": 0.5
    "[lv-f1]": "David Beckham",  # 1
    "[lv-f2]": "Beckham",  # P 1, R 1/2: 2/3
}


def run_lv(out_dir: Path, model: ScriptedModel, data_dir: Path = FIXTURES / "lveval", **kwargs):
    kwargs.setdefault("chat_template", chat)
    kwargs.setdefault("subsets", LV_SUBSETS)
    return lveval.run_lveval(data_dir, out_dir, model, CharTokenizer(), BIG, **kwargs)


def test_lveval_scores(tmp_path: Path):
    model = ScriptedModel(LV_ANSWERS)
    result = run_lv(tmp_path / "run", model)
    # hotpotwikiqa: (0.4 + 0) / 2 = 20.0 ; cmrc: (0.75 + 0) / 2 = 37.5
    # dureader_mixup: 0.5 -> 50.0 ; factrecall_en: (1 + 2/3) / 2 = 83.333... -> 83.33
    assert result.scores == {
        "hotpotwikiqa_mixup": 20.0,
        "cmrc_mixup": 37.5,
        "dureader_mixup": 50.0,
        "factrecall_en": 83.33,
    }
    # (20 + 37.5 + 50 + 83.33) / 4 = 47.7075 -> 47.71
    assert result.average == 47.71
    assert result.settings["level"] == "128k"
    assert model.budget_for("[lv-w1]") == 64 and model.budget_for("[lv-f1]") == 16
    # the chat format wraps every LV-Eval prompt
    assert model.prompt_for("[lv-f1]") == chat(
        lveval.DATASET_PROMPT["factrecall_en"].format(
            context="David Beckham is a footballer.", input="[lv-f1] Who is the footballer?"
        )
    )
    lines = (tmp_path / "run" / "cmrc_mixup_128k.jsonl").read_text(encoding="utf-8").splitlines()
    # ids are line numbers; a missing answer_keywords is saved as gold_ans null
    assert json.loads(lines[0])["id"] == "1" and json.loads(lines[0])["gold_ans"] is None


def test_lveval_resume(tmp_path: Path):
    result = run_lv(tmp_path / "run", ScriptedModel(LV_ANSWERS))
    again = ScriptedModel({})
    assert run_lv(tmp_path / "run", again).scores == result.scores
    assert again.calls == []


def test_lveval_truncation():
    sample = lveval.load_lveval(FIXTURES / "lveval", "factrecall_en", "128k")[0]
    full = lveval.DATASET_PROMPT["factrecall_en"].format(
        context=sample.fields["context"], input=sample.fields["input"]
    )
    assert (
        lveval.build_prompt(sample, "factrecall_en", CharTokenizer(), 30) == full[:15] + full[-15:]
    )


def test_lveval_missing_file_and_bad_field(tmp_path: Path, data_copy):
    with pytest.raises(
        FileNotFoundError,
        match=r"LV-Eval file for subset 'lic_mixup' at level '128k' not found: .*_128k\.jsonl",
    ):
        run_lv(tmp_path / "run", ScriptedModel({}), subsets=("lic_mixup",))
    with pytest.raises(ValueError, match="unknown LV-Eval level '100k'"):
        run_lv(tmp_path / "run", ScriptedModel({}), level="100k")
    data = data_copy("lveval")
    path = data / "factrecall_en_128k.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[1])
    bad["answer_keywords"] = ["David", "Beckham"]
    path.write_text(lines[0] + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(
        DataFormatError,
        match=r"factrecall_en_128k\.jsonl, line 2: field 'answer_keywords' should be str or null",
    ):
        run_lv(tmp_path / "run", ScriptedModel({}), data_dir=data)
