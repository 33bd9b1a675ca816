"""LongBench v1 from the official local files, with the official prompts, truncation and scorer.

Run::

    result = run_longbench("data/longbench", "runs/lb", generate_fn, tokenizer, max_length=31500,
                           chat_template=hf_chat_template(tokenizer, enable_thinking=False))

The data folder holds the official ``{subset}.jsonl`` files (fields ``input``, ``context``,
``answers``, ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``). Predictions go to
``{out_dir}/{subset}.jsonl`` in the official ``pred.py`` layout plus an ``id``; scores to
``scores.json`` / ``scores.md``.

What reproduces the official ``pred.py`` / ``eval.py``:

- prompt = ``dataset2prompt[subset].format(context=..., input=...)`` (the v1 release strings,
  typos such as narrativeqa's "asconcisely" included, since published numbers used them);
- truncation: if the tokenised prompt is longer than ``max_length`` keep the first and last
  ``max_length // 2`` tokens, decoding each half separately;
- the chat template is applied after truncation except for trec, triviaqa, samsum, lsht, lcc
  and repobench-p (few-shot / completion tasks);
- ``max_new_tokens`` from ``dataset2maxlen``; decoding must be greedy (``generate_fn``'s job);
- scoring: first line only for trec, triviaqa, samsum and lsht; each sample scores the max over
  its answers; a subset scores ``round(100 * mean, 2)``.

Not reproduced: samsum's extra stop on "\\n" and ``min_length`` in the official ``generate``
call (``generate_fn`` has no stop-string argument); the first-line rule at scoring time makes
the difference small, and samsum is not one of the paper's subsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import metrics
from .common import (
    BenchmarkResult,
    ChatTemplate,
    GenerateFn,
    Sample,
    TokenizerLike,
    average,
    keep_ids,
    load_samples,
    middle_truncate,
    predict_subsets,
    read_predictions,
    require_file,
    subset_preds_path,
    write_results,
)

# The six subsets of the paper (Table 2/3, after AHN), 37k tokens on average.
PAPER_SUBSETS: tuple[str, ...] = (
    "dureader",
    "hotpotqa",
    "musique",
    "narrativeqa",
    "qmsum",
    "triviaqa",
)

# Official LongBench v1 ``config/dataset2prompt.json``, verbatim.
DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}  # fmt: skip

# Official LongBench v1 ``config/dataset2maxlen.json`` (max new tokens).
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}  # fmt: skip

# Official ``eval.py`` ``dataset2metric``.
DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": metrics.qa_f1_score, "qasper": metrics.qa_f1_score,
    "multifieldqa_en": metrics.qa_f1_score, "multifieldqa_zh": metrics.qa_f1_zh_score,
    "hotpotqa": metrics.qa_f1_score, "2wikimqa": metrics.qa_f1_score,
    "musique": metrics.qa_f1_score, "dureader": metrics.rouge_zh_score,
    "gov_report": metrics.rouge_score, "qmsum": metrics.rouge_score,
    "multi_news": metrics.rouge_score, "vcsum": metrics.rouge_zh_score,
    "trec": metrics.classification_score, "triviaqa": metrics.qa_f1_score,
    "samsum": metrics.rouge_score, "lsht": metrics.classification_score,
    "passage_retrieval_en": metrics.retrieval_score, "passage_count": metrics.count_score,
    "passage_retrieval_zh": metrics.retrieval_zh_score, "lcc": metrics.code_sim_score,
    "repobench-p": metrics.code_sim_score,
}  # fmt: skip

# ``pred.py``: "chat models are better off without build prompts on these tasks".
NO_CHAT_TEMPLATE: frozenset[str] = frozenset(
    {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
)
# ``eval.py``: only the first line of the prediction is scored for these.
FIRST_LINE_ONLY: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
CLASSIFICATION: frozenset[str] = frozenset({"trec", "lsht"})


def _check_subset(subset: str) -> None:
    if subset not in DATASET2PROMPT:
        raise ValueError(f"unknown LongBench subset {subset!r}; known: {sorted(DATASET2PROMPT)}")


def load_longbench(data_dir: str | Path, subset: str, *, limit: int | None = None) -> list[Sample]:
    """Read ``{data_dir}/{subset}.jsonl``; every record needs ``_id``, ``input``, ``context``,
    ``answers`` (and ``all_classes`` as a list for the classification subsets trec/lsht)."""
    _check_subset(subset)
    fields: dict[str, type | tuple[type, ...]] = {
        "_id": (str, int),
        "input": str,
        "context": str,
        "answers": list,
    }
    optional: dict[str, type | tuple[type, ...]] = {"all_classes": (list, type(None))}
    if subset in CLASSIFICATION:
        fields["all_classes"] = list
        optional = {}
    return load_samples(
        Path(data_dir) / f"{subset}.jsonl",
        what=f"LongBench file for subset {subset!r}",
        fields=fields,
        optional=optional,
        list_fields=("answers",),
        id_field="_id",
        limit=limit,
    )


def build_prompt(
    sample: Sample,
    subset: str,
    tokenizer: TokenizerLike,
    max_length: int,
    chat_template: ChatTemplate | None = None,
) -> str:
    """Official prompt: template, middle truncation to ``max_length`` tokens, then chat rule."""
    prompt = DATASET2PROMPT[subset].format(
        context=sample.fields["context"], input=sample.fields["input"]
    )
    prompt = middle_truncate(prompt, tokenizer, max_length, style="longbench")
    if chat_template is not None and subset not in NO_CHAT_TEMPLATE:
        prompt = chat_template(prompt)
    return prompt


def scorer(
    dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], all_classes: Any
) -> float:
    """Official ``eval.py`` ``scorer``: first-line rule, max over answers, round(100 * mean, 2)."""
    metric = DATASET2METRIC[dataset]
    total_score = 0.0
    for prediction, ground_truths in zip(predictions, answers, strict=True):
        if dataset in FIRST_LINE_ONLY:
            prediction = prediction.lstrip("\n").split("\n")[0]
        score = 0.0
        for ground_truth in ground_truths:
            score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
        total_score += score
    if not predictions:
        return 0.0
    return round(100 * total_score / len(predictions), 2)


def _record(sample: Sample, prediction: str) -> dict[str, Any]:
    """The official pred.py record (pred is added by the caller)."""
    fields = sample.fields
    return {
        "answers": fields["answers"],
        "all_classes": fields.get("all_classes"),
        "length": fields.get("length"),
    }


def score_longbench(
    out_dir: str | Path,
    subsets: Sequence[str] = PAPER_SUBSETS,
    *,
    settings: dict[str, Any] | None = None,
    ids: dict[str, list[str]] | None = None,
) -> BenchmarkResult:
    """Score existing ``{out_dir}/{subset}.jsonl`` predictions; write scores.json/.md.

    As in the official ``eval.py``, ``all_classes`` is taken from the file's last record (it is
    the same for every record of a subset). ``ids`` (subset -> sample ids) restricts scoring to
    those samples; the runner passes the ids it was asked to run.
    """
    out_dir = Path(out_dir)
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    for subset in subsets:
        _check_subset(subset)
        path = require_file(
            subset_preds_path(out_dir, subset), f"LongBench predictions for {subset!r}"
        )
        records = keep_ids(
            read_predictions(path, ("answers",)), None if ids is None else ids[subset]
        )
        all_classes = records[-1].get("all_classes") if records else None
        scores[subset] = scorer(
            subset, [r["pred"] for r in records], [r["answers"] for r in records], all_classes
        )
        counts[subset] = len(records)
    result = BenchmarkResult("longbench", scores, counts, average(scores), out_dir, settings or {})
    write_results(result)
    return result


def run_longbench(
    data_dir: str | Path,
    out_dir: str | Path,
    generate_fn: GenerateFn,
    tokenizer: TokenizerLike,
    max_length: int,
    *,
    subsets: Sequence[str] = PAPER_SUBSETS,
    chat_template: ChatTemplate | None = None,
    limit: int | None = None,
) -> BenchmarkResult:
    """Predict (resuming: ids already in the predictions file are skipped) and score.

    ``max_length`` is the prompt budget in tokens (the official ``model2maxlen``, e.g. 31500
    for 32k models). All files are validated before the first generation, so a format error
    does not surface hours into a run.
    """
    out_dir = Path(out_dir)
    for subset in subsets:
        _check_subset(subset)
    data = {subset: load_longbench(data_dir, subset, limit=limit) for subset in subsets}
    settings = {"max_length": max_length, "chat_template": chat_template is not None}
    ids = predict_subsets(
        out_dir, "longbench", data, generate_fn, settings,
        build_prompt=lambda s, subset: build_prompt(s, subset, tokenizer, max_length, chat_template),
        max_new_tokens=DATASET2MAXLEN,
        make_record=_record,
    )
    return score_longbench(out_dir, subsets, settings={**settings, "limit": limit}, ids=ids)
