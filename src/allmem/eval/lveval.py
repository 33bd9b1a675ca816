"""LV-Eval from the official local files, with the official prompts, truncation and metrics.

Run::

    result = run_lveval("data/lveval", "runs/lv", generate_fn, tokenizer, max_length=127500,
                        level="128k", chat_template=hf_chat_template(tokenizer))

Files: ``{data_dir}/{subset}_{level}.jsonl`` (fields ``input``, ``context``, ``answers``,
``length``, ``dataset``, ``language``, ``answer_keywords``, ``confusing_facts``). Records have
no id, so a sample's id is its line number in the file. Predictions go to
``{out_dir}/{subset}_{level}.jsonl`` in the official layout (``pred``, ``answers``,
``gold_ans``, ``input``, ``length``) plus ``id``.

What reproduces the official ``prediction.py`` / ``evaluation.py``:

- ``DATASET_PROMPT`` templates and ``DATASET_MAXGEN`` (64 new tokens, 16 for factrecall);
- LongBench-style middle truncation to ``max_length`` tokens (halves decoded separately);
- the chat format (``build_chat`` in the official code, model-specific) is applied to every
  subset when ``chat_template`` is given;
- scoring uses ``answers[0]`` only, with ``answer_keywords`` as the keywords of the gated F1;
  a subset scores ``round(100 * mean, 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    mean_percent,
    middle_truncate,
    predict_subsets,
    read_predictions,
    require_file,
    subset_preds_path,
    write_results,
)

SUBSETS: tuple[str, ...] = (
    "cmrc_mixup", "dureader_mixup", "factrecall_en", "factrecall_zh", "hotpotwikiqa_mixup",
    "lic_mixup", "loogle_CR_mixup", "loogle_MIR_mixup", "loogle_SD_mixup",
    "multifieldqa_en_mixup", "multifieldqa_zh_mixup",
)  # fmt: skip
LEVELS: tuple[str, ...] = ("16k", "32k", "64k", "128k", "256k")

_EN_MIXUP = (
    "Please answer the following question based on the given passages. Questions and answers are only relevant to one passage. Only give me the answer and do not output any other explanation and evidence.\n\nArticle: {context}\n\nPlease answer the following question based on the above passages. Questions and answers are only relevant to one passage. Only give me the answer and do not output any other explanation and evidence.\n\nQuestion: {input}\nAnswer:"
)  # fmt: skip

# Official ``config.py`` ``DATASET_PROMPT``, verbatim.
DATASET_PROMPT: dict[str, str] = {
    "hotpotwikiqa_mixup": "Answer the question based on the given passages. Questions and answers are only relevant to some passages. Only give me the answer and do not output any other explanation and evidence.\n\nArticle: {context}\n\nPlease answer the following question based on the above passages. Questions and answers are only relevant to some passages. Only give me the answer and do not output any other explanation and evidence.\n\nQuestion: {input}\nAnswer:",
    "loogle_SD_mixup": _EN_MIXUP,
    "loogle_CR_mixup": _EN_MIXUP,
    "loogle_MIR_mixup": _EN_MIXUP,
    "multifieldqa_en_mixup": _EN_MIXUP,
    "multifieldqa_zh_mixup": "请阅读以下文章并用中文回答问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n文章：{context}\n\n请基于上面的文章回答下面的问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n问题：{input}\n回答：",
    "factrecall_en": "Please answer the following questions based on the given article.\n\nArticle: {context}\n\nPlease answer the following questions based on the above article.\n\nQuestion: {input}\nAnswer:",
    "factrecall_zh": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n现在请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "cmrc_mixup": "请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：{input}\n回答：",
    "lic_mixup": "请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n请现在基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：{input}\n回答：",
    "dureader_mixup": "请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：{input}\n回答：",
}  # fmt: skip

# Official ``DATASET_MAXGEN``.
DATASET_MAXGEN: dict[str, int] = {name: 64 for name in SUBSETS} | {
    "factrecall_en": 16,
    "factrecall_zh": 16,
}

# Official ``DATASET_METRIC`` by name: "gated_en" / "gated_zh" = qa_f1_score_with_gold_ans /
# qa_f1_zh_score_with_gold_ans; "rouge_blacklist" = rouge_zh_score_blacklist.
DATASET_METRIC: dict[str, str] = {
    "hotpotwikiqa_mixup": "gated_en", "loogle_SD_mixup": "gated_en",
    "loogle_CR_mixup": "gated_en", "loogle_MIR_mixup": "gated_en",
    "multifieldqa_en_mixup": "gated_en", "multifieldqa_zh_mixup": "gated_zh",
    "cmrc_mixup": "gated_zh", "lic_mixup": "gated_zh",
    "factrecall_en": "qa_f1", "factrecall_zh": "qa_f1_zh",
    "dureader_mixup": "rouge_blacklist",
}  # fmt: skip


def _check(subset: str, level: str) -> None:
    if subset not in DATASET_PROMPT:
        raise ValueError(f"unknown LV-Eval subset {subset!r}; known: {list(SUBSETS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown LV-Eval level {level!r}; known: {list(LEVELS)}")


def file_stem(subset: str, level: str) -> str:
    return f"{subset}_{level}"


def load_lveval(
    data_dir: str | Path, subset: str, level: str, *, limit: int | None = None
) -> list[Sample]:
    """Read ``{data_dir}/{subset}_{level}.jsonl``; records need ``input``, ``context`` and
    ``answers``; ``answer_keywords`` (a string) is optional, as in the official code."""
    _check(subset, level)
    return load_samples(
        Path(data_dir) / f"{file_stem(subset, level)}.jsonl",
        what=f"LV-Eval file for subset {subset!r} at level {level!r}",
        fields={"input": str, "context": str, "answers": list},
        optional={"answer_keywords": (str, type(None))},
        list_fields=("answers",),
        limit=limit,
    )


def build_prompt(
    sample: Sample,
    subset: str,
    tokenizer: TokenizerLike,
    max_length: int,
    chat_template: ChatTemplate | None = None,
) -> str:
    """Official prompt: template, middle truncation (``truncate_prompt``), then the chat format."""
    prompt = DATASET_PROMPT[subset].format(
        context=sample.fields["context"], input=sample.fields["input"]
    )
    prompt = middle_truncate(prompt, tokenizer, max_length, style="longbench")
    return chat_template(prompt) if chat_template is not None else prompt


def score_sample(
    subset: str, prediction: str, answers: Sequence[str], answer_keywords: str | None
) -> float:
    """Official ``scorer``: only ``answers[0]`` counts (an empty list scores 0)."""
    if not answers:
        return 0.0
    kind = DATASET_METRIC[subset]
    ground_truth = answers[0]
    if kind == "qa_f1":
        return metrics.qa_f1_score(prediction, ground_truth)
    if kind == "qa_f1_zh":
        return metrics.qa_f1_zh_score(prediction, ground_truth)
    if kind == "rouge_blacklist":
        return metrics.lveval_rouge_zh_score(prediction, ground_truth)
    language = kind.removeprefix("gated_")
    return metrics.lveval_qa_f1_score(prediction, ground_truth, answer_keywords, language)


def score_lveval(
    out_dir: str | Path,
    subsets: Sequence[str] = SUBSETS,
    level: str = "128k",
    *,
    settings: dict[str, Any] | None = None,
    ids: dict[str, list[str]] | None = None,
) -> BenchmarkResult:
    """Score existing ``{out_dir}/{subset}_{level}.jsonl`` predictions; write scores.json/.md.

    Scores are keyed by subset name; the level is recorded in the settings. ``ids`` (subset ->
    sample ids) restricts scoring to those samples; the runner passes the ids it was asked to run.
    """
    out_dir = Path(out_dir)
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    for subset in subsets:
        _check(subset, level)
        path = require_file(
            subset_preds_path(out_dir, file_stem(subset, level)),
            f"LV-Eval predictions for {subset!r}",
        )
        records = keep_ids(
            read_predictions(path, ("answers",)), None if ids is None else ids[subset]
        )
        scores[subset] = mean_percent(
            [score_sample(subset, r["pred"], r["answers"], r.get("gold_ans")) for r in records]
        )
        counts[subset] = len(records)
    result = BenchmarkResult(
        "lveval", scores, counts, average(scores), out_dir, {"level": level, **(settings or {})}
    )
    write_results(result)
    return result


def _record(sample: Sample, prediction: str) -> dict[str, Any]:
    """The official prediction.py record (pred is added by the caller)."""
    fields = sample.fields
    return {
        "answers": fields["answers"],
        "gold_ans": fields.get("answer_keywords"),
        "input": fields["input"],
        "length": fields.get("length"),
    }


def run_lveval(
    data_dir: str | Path,
    out_dir: str | Path,
    generate_fn: GenerateFn,
    tokenizer: TokenizerLike,
    max_length: int,
    *,
    level: str = "128k",
    subsets: Sequence[str] = SUBSETS,
    chat_template: ChatTemplate | None = None,
    limit: int | None = None,
) -> BenchmarkResult:
    """Predict (resuming by line number) and score one length level.

    ``max_length`` is the prompt budget in tokens (the official ``--model-max-length``,
    15500 by default there). All files are validated before the first generation.
    """
    out_dir = Path(out_dir)
    for subset in subsets:
        _check(subset, level)
    data = {subset: load_lveval(data_dir, subset, level, limit=limit) for subset in subsets}
    settings = {"max_length": max_length, "chat_template": chat_template is not None}
    # the level is in every file name, so levels can share a folder
    ids = predict_subsets(
        out_dir, "lveval", data, generate_fn, settings,
        build_prompt=lambda s, subset: build_prompt(s, subset, tokenizer, max_length, chat_template),
        max_new_tokens=DATASET_MAXGEN,
        make_record=_record,
        file_stem=lambda subset: file_stem(subset, level),
    )
    return score_lveval(out_dir, subsets, level, settings={**settings, "limit": limit}, ids=ids)
