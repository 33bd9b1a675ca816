"""Official metrics against values worked out by hand from their definitions.

Each expected number is derived in the comment above it: tokens after normalisation, the
overlap c, then P = c/|pred|, R = c/|gold| and F1 = 2PR/(P+R). ROUGE numbers follow
``rouge==1.0.1``: words counted once (sets), F = 2PR/(P+R+1e-8).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest

from allmem.eval import metrics as m
from allmem.eval.metrics import (
    classification_score,
    code_sim_score,
    count_score,
    lveval_qa_f1_score,
    lveval_rouge_zh_score,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_char_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
)


def test_jieba_cuts_used_below():
    # The Chinese cases rely on these precise-mode cuts; if jieba's dictionary changes, the
    # failure shows here rather than as a puzzling number further down.
    assert m._jieba_cut("中国的首都是北京") == ["中国", "的", "首都", "是", "北京"]
    assert m._jieba_cut("首都是北京") == ["首都", "是", "北京"]
    assert m._jieba_cut("北京是首都") == ["北京", "是", "首都"]
    assert m._jieba_cut("北京。") == ["北京", "。"]


# ----------------------------------------------------------------------------- normalisation


def test_normalize_answer():
    # lower -> "the cat, sat!  on a mat." ; punctuation -> "the cat sat  on a mat"
    # articles -> " cat sat  on   mat" ; whitespace -> "cat sat on mat"
    assert normalize_answer("The Cat, sat!  on A mat.") == "cat sat on mat"
    # punctuation goes first, so "the-end" becomes one word "theend" and keeps its article
    assert normalize_answer("the-end") == "theend"
    # only whole words: "another" and "theory" are untouched
    assert normalize_answer("another theory") == "another theory"


def test_normalize_zh_answer():
    # lower, drop "，", "！" and ".", then delete (not collapse) whitespace
    assert normalize_zh_answer("你好，世界！ Hello World.") == "你好世界helloworld"


# ----------------------------------------------------------------------------- token F1


def test_qa_f1_partial_overlap():
    # pred "the cat sat" -> [cat, sat]; gold "a cat sat down" -> [cat, sat, down]
    # c = 2, P = 2/2 = 1, R = 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    assert qa_f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)


def test_qa_f1_counts_repeated_tokens_once_per_gold_occurrence():
    # pred [cat, cat, cat], gold [cat, dog]: c = min(3, 1) = 1, P = 1/3, R = 1/2
    # F1 = 2*(1/6)/(5/6) = 0.4
    assert qa_f1_score("cat cat cat", "cat dog") == pytest.approx(0.4)


def test_qa_f1_no_overlap_and_empty_are_zero():
    assert qa_f1_score("dog", "cat") == 0.0
    assert qa_f1_score("", "cat") == 0.0
    assert qa_f1_score("The", "the") == 0.0  # both normalise to nothing: c = 0


def test_qa_f1_zh():
    # pred [首都, 是, 北京]; gold [中国, 的, 首都, 是, 北京]
    # c = 3, P = 1, R = 3/5, F1 = 2*0.6/1.6 = 0.75
    assert qa_f1_zh_score("首都是北京", "中国的首都是北京") == pytest.approx(0.75)
    # "。" normalises to "" and is dropped: [北京] vs [北京] -> 1
    assert qa_f1_zh_score("北京。", "北京") == pytest.approx(1.0)


def test_qa_f1_zh_char_infinitebench():
    # characters after normalisation: [北, 京] vs [北, 京, 市]: c = 2, P = 1, R = 2/3 -> 0.8
    assert qa_f1_zh_char_score("北京。", "北京市") == pytest.approx(0.8)
    # no jieba: "李白杜甫" is 4 characters, [李, 白] gold: P = 1/2, R = 1 -> 2/3
    assert qa_f1_zh_char_score("李白杜甫", "李白") == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_counts_unique_words():
    # hyp words {the, cat, sat, on, mat} (n = 5), ref {the, cat, is, on, mat} (m = 5).
    # LCS(ref, hyp) = "the cat on the mat", as a set {the, cat, on, mat} = 4 words.
    # P = R = 4/5, F = 2*0.64/(1.6+1e-8) = 0.8 (a count-based ROUGE-L would give 5/6).
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(
        0.8, abs=1e-7
    )


def test_rouge_l_is_case_sensitive_and_zero_on_error():
    # {Cat} vs {cat}: no common word, F = 0/(0+0+1e-8) = 0
    assert rouge_score("Cat", "cat") == 0.0
    # an empty hypothesis raises inside rouge ("Hypothesis is empty."): caught -> 0
    assert rouge_score("", "cat") == 0.0
    # "..." splits into no sentence at all: also an exception -> 0
    assert rouge_score("...", "cat") == 0.0


def test_rouge_l_splits_sentences_on_periods():
    # hyp "a b. c" -> sentences ["a b", "c"]; ref "a b c" -> ["a b c"]. Union LCS of the ref
    # sentence with both hyp sentences = {a, b} u {c} = 3 words: P = R = 3/3 -> F ~ 1
    assert rouge_score("a b. c", "a b c") == pytest.approx(1.0, abs=1e-7)


def test_rouge_zh():
    # [北京, 是, 首都] vs [首都, 是, 北京]: LCS has length 1 (any one word), P = R = 1/3
    # F = 2*(1/9)/(2/3) = 1/3
    assert rouge_zh_score("北京是首都", "首都是北京") == pytest.approx(1 / 3, abs=1e-7)


# ----------------------------------------------------------------------------- classification etc.


def test_classification_score_named_classes():
    classes = ["Location", "Person", "Description", "Number"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    # two classes named, gold among them: 1/2
    assert classification_score("Location or Person", "Location", all_classes=classes) == 0.5
    assert classification_score("Person", "Location", all_classes=classes) == 0.0
    # nothing named: the official difflib fallback is unreachable, so 0
    assert classification_score("a place", "Location", all_classes=classes) == 0.0


def test_classification_score_substring_removal_quirk():
    # matches "food" and "seafood"; "food" is a proper substring of the gold -> removed -> 1/1
    assert classification_score("seafood", "seafood", all_classes=["food", "seafood", "veg"]) == 1.0
    # matches [a, b, abc, c]; removing "a" shifts the list, so "b" is skipped and survives,
    # "abc" is kept, "c" is removed -> [b, abc] -> 1/2 (a correct loop would give 1)
    assert classification_score("abc", "abc", all_classes=["a", "b", "abc", "c"]) == 0.5


def test_count_and_retrieval_scores():
    # numbers [3, 4, 3], gold 3 -> 2/3
    assert count_score("There are 3 paragraphs, not 4 or 3", 3) == pytest.approx(2 / 3)
    assert count_score("no numbers", 3) == 0.0
    # numbers [1, 12], gold id 12 -> 1/2
    assert retrieval_score("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5
    assert retrieval_zh_score("段落5", "段落5") == 1.0


def test_code_sim_score():
    # first line without ` # or // is "x = 1": identical -> 100 -> 1.0
    assert code_sim_score("\n```python\n# set x\nx = 1\n", "x = 1") == 1.0
    # SequenceMatcher: matching "x = " (4 chars) of 10 in total -> 2*4/10 = 0.8 -> 80
    assert code_sim_score("x = 2", "x = 1") == pytest.approx(0.8)
    # only comment lines: the line is "" -> 0
    assert code_sim_score("# a\n// b", "x = 1") == 0.0


def test_code_sim_matches_fuzzywuzzy_without_levenshtein():
    """LongBench ran fuzzywuzzy without python-Levenshtein (difflib); check we equal that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuzzywuzzy warns at import that it is pure Python
        from fuzzywuzzy import fuzz
    # python-Levenshtein would change fuzzywuzzy's ratio; LongBench ran without it, and so do we
    assert importlib.util.find_spec("Levenshtein") is None
    pairs = [
        ("x = 2", "x = 1"),
        ("return foo(bar)", "return bar(foo)"),
        ("", ""),
        ("", "a"),
        ("abc", "abc"),
    ]
    for a, b in pairs:
        assert m._fuzz_ratio(a, b) == fuzz.ratio(a, b), (a, b)


# ----------------------------------------------------------------------------- LV-Eval


def test_lveval_english_gate_passes_then_plain_f1():
    # pred -> [coach, was, stoutland]; keywords -> [jeff, stoutland]; hits {stoutland} = 1
    # recall 1/2 >= 0.2 -> F1 against the answer [jeff, stoutland]: c = 1, P = 1/3, R = 1/2
    # F1 = 2*(1/6)/(5/6) = 0.4
    assert lveval_qa_f1_score(
        "The coach was Stoutland", "Jeff Stoutland", "Jeff Stoutland", "en"
    ) == pytest.approx(0.4)


def test_lveval_english_below_keyword_recall_scores_zero():
    pred, answer = "it was in the year of his birth", "in the year 1990"
    # plain F1: pred [it, was, in, year, of, his, birth], gold [in, year, 1990]: c = 2,
    # P = 2/7, R = 2/3, F1 = (8/21)/(20/21) = 0.4 ...
    assert qa_f1_score(pred, answer) == pytest.approx(0.4)
    # ... but keyword "1990" is not recalled: recall 0 < 0.2 -> 0
    assert lveval_qa_f1_score(pred, answer, "1990", "en") == 0.0


def test_lveval_english_blacklist_and_threshold_boundary():
    # keywords [stoutland, and, his, line]; hits "and", "his" are blacklisted -> 0/4 -> 0
    assert lveval_qa_f1_score("and his", "and his", "Stoutland and his line", "en") == 0.0
    # 1 hit of 5 keyword words = 0.2 exactly: not below the threshold, so F1 (pred = gold) = 1
    assert lveval_qa_f1_score("alpha", "alpha", "alpha beta gamma delta epsilon", "en") == 1.0
    # no keywords: no gate, plain F1
    assert lveval_qa_f1_score("alpha", "alpha beta", None, "en") == pytest.approx(2 / 3)
    assert lveval_qa_f1_score("alpha", "alpha beta", "", "en") == pytest.approx(2 / 3)


def test_lveval_chinese_gate_uses_answer_when_no_keywords():
    gold = "中国的首都是北京"  # [中国, 的, 首都, 是, 北京]
    # pred [首都]: recall 1/5 = 0.2 < 0.4 -> 0 (plain F1 would be 2*0.2/1.2 = 1/3)
    assert qa_f1_zh_score("首都", gold) == pytest.approx(1 / 3)
    assert lveval_qa_f1_score("首都", gold, None, "zh") == 0.0
    # pred [首都, 是, 北京]: hits 首都, 北京 ("是" is blacklisted) -> 2/5 = 0.4, passes
    # -> F1 = 0.75 (see test_qa_f1_zh)
    assert lveval_qa_f1_score("首都是北京", gold, None, "zh") == pytest.approx(0.75)
    # explicit keywords [北京]: pred [首都] recalls none -> 0
    assert lveval_qa_f1_score("首都", "首都", "北京", "zh") == 0.0


def test_lveval_rejects_unknown_language():
    with pytest.raises(ValueError, match="language"):
        lveval_qa_f1_score("a", "a", None, "fr")


def test_lveval_rouge_zh_blacklist():
    # blacklist drops "是": "北京 首都" vs "首都 北京"; LCS 1 of 2 words: P = R = 1/2 -> 0.5
    # (without the blacklist, rouge_zh gives 1/3: see test_rouge_zh)
    assert lveval_rouge_zh_score("北京是首都", "首都是北京") == pytest.approx(0.5, abs=1e-7)
    # a prediction made only of blacklisted words is empty after filtering -> 0
    assert lveval_rouge_zh_score("的", "首都是北京") == 0.0


def test_blacklists_are_the_official_sizes():
    assert len(m.LVEVAL_BLACKLIST_EN) == 38
    assert len(set(m.LVEVAL_BLACKLIST_ZH)) == 85
