"""InfiniteBench longbook QA (English and Chinese) from the official local files.

Run::

    result = run_infinitebench("data/infinitebench", "runs/ib", generate_fn, tokenizer)

Files: ``{data_dir}/longbook_qa_eng.jsonl`` and ``longbook_qa_chn.jsonl`` (fields ``id``,
``context``, ``input``, ``answer`` (list), ``options``). Predictions go to
``{out_dir}/{subset}.jsonl`` with the official ``id`` / ``pred`` / ``label`` keys, so the
official ``compute_scores.py`` can read them too.

What reproduces the official open-model path (``eval_yarn_mistral.py`` + ``eval_utils.py``):

- the open-model templates (``yarn_mistral_templates``) with ``{question}`` = ``input``;
- 40 new tokens (``DATA_NAME_TO_MAX_NEW_TOKENS``);
- truncation to 128k = 131072 tokens by keeping the first and last 65536 tokens, decoding the
  joined token list once (unlike LongBench, which decodes the halves separately); every
  prompt, cut or not, is decoded back from its tokens, as the official code does;
- no chat template by default (the official open-model path has none); pass one to wrap every
  prompt, as a chat model such as Qwen3 needs;
- English: max over answers of token F1 after ``normalize_answer``; Chinese: max over answers
  of character-level F1 after ``normalize_zh_answer``; a subset scores 100 x mean, rounded to
  2 decimals as the other benchmarks (the official script prints the raw fraction).
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
    mean_percent,
    middle_truncate,
    predict_subsets,
    read_predictions,
    require_file,
    subset_preds_path,
    write_results,
)

SUBSETS: tuple[str, ...] = ("longbook_qa_eng", "longbook_qa_chn")

# Official ``yarn_mistral_templates`` (the template for open models), verbatim.
TEMPLATES: dict[str, str] = {
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\nAnswer:",
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
}  # fmt: skip
MAX_NEW_TOKENS: dict[str, int] = {"longbook_qa_eng": 40, "longbook_qa_chn": 40}
TRUNCATE_LEN = 128 * 1024

METRIC: dict[str, Callable[..., float]] = {
    "longbook_qa_eng": metrics.qa_f1_score,
    "longbook_qa_chn": metrics.qa_f1_zh_char_score,
}


def _check_subset(subset: str) -> None:
    if subset not in TEMPLATES:
        raise ValueError(f"unknown InfiniteBench subset {subset!r}; known: {list(SUBSETS)}")


def load_infinitebench(
    data_dir: str | Path, subset: str, *, limit: int | None = None
) -> list[Sample]:
    """Read ``{data_dir}/{subset}.jsonl``; records need id, context, input and answer."""
    _check_subset(subset)
    return load_samples(
        Path(data_dir) / f"{subset}.jsonl",
        what=f"InfiniteBench file for subset {subset!r}",
        fields={"id": (int, str), "context": str, "input": str, "answer": list},
        list_fields=("answer",),
        id_field="id",
        limit=limit,
    )


def build_prompt(
    sample: Sample,
    subset: str,
    tokenizer: TokenizerLike,
    max_length: int = TRUNCATE_LEN,
    chat_template: ChatTemplate | None = None,
) -> str:
    """Official prompt, cut to ``max_length`` tokens around the middle, then the chat template."""
    prompt = TEMPLATES[subset].format(
        context=sample.fields["context"], question=sample.fields["input"]
    )
    prompt = middle_truncate(prompt, tokenizer, max_length, style="infinitebench")
    return chat_template(prompt) if chat_template is not None else prompt


def score_sample(subset: str, prediction: str, answers: Sequence[str]) -> float:
    """Max over the gold answers, as the official ``qa_f1_score`` / ``qa_f1_score_zh``."""
    metric = METRIC[subset]
    return max((metric(prediction, answer) for answer in answers), default=0.0)


def score_infinitebench(
    out_dir: str | Path,
    subsets: Sequence[str] = SUBSETS,
    *,
    settings: dict[str, Any] | None = None,
    ids: dict[str, list[str]] | None = None,
) -> BenchmarkResult:
    """Score existing ``{out_dir}/{subset}.jsonl`` predictions; write scores.json/.md.

    ``ids`` (subset -> sample ids) restricts scoring to those samples; the runner passes the
    ids it was asked to run.
    """
    out_dir = Path(out_dir)
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    for subset in subsets:
        _check_subset(subset)
        path = require_file(
            subset_preds_path(out_dir, subset), f"InfiniteBench predictions for {subset!r}"
        )
        records = keep_ids(read_predictions(path, ("label",)), None if ids is None else ids[subset])
        scores[subset] = mean_percent(
            [score_sample(subset, r["pred"], r["label"]) for r in records]
        )
        counts[subset] = len(records)
    result = BenchmarkResult(
        "infinitebench", scores, counts, average(scores), out_dir, settings or {}
    )
    write_results(result)
    return result


def run_infinitebench(
    data_dir: str | Path,
    out_dir: str | Path,
    generate_fn: GenerateFn,
    tokenizer: TokenizerLike,
    max_length: int = TRUNCATE_LEN,
    *,
    subsets: Sequence[str] = SUBSETS,
    chat_template: ChatTemplate | None = None,
    limit: int | None = None,
) -> BenchmarkResult:
    """Predict (resuming by ``id``) and score; all files are validated before generating."""
    out_dir = Path(out_dir)
    for subset in subsets:
        _check_subset(subset)
    data = {subset: load_infinitebench(data_dir, subset, limit=limit) for subset in subsets}
    settings = {"max_length": max_length, "chat_template": chat_template is not None}
    ids = predict_subsets(
        out_dir, "infinitebench", data, generate_fn, settings,
        build_prompt=lambda s, subset: build_prompt(s, subset, tokenizer, max_length, chat_template),
        max_new_tokens=MAX_NEW_TOKENS,
        make_record=lambda s, _pred: {"label": s.fields["answer"]},
    )
    return score_infinitebench(out_dir, subsets, settings={**settings, "limit": limit}, ids=ids)
