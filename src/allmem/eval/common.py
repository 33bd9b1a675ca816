"""Shared machinery of the benchmark runners: JSONL I/O, validation, truncation, resume, tables.

Every runner follows the same shape, so it lives here once:

1. read the official JSONL file, validating each record (errors name file, line and field);
2. for each sample not already in the predictions file, build the prompt (template ->
   middle truncation with the tokenizer -> optional chat template), call
   ``generate_fn(prompt, max_new_tokens)`` and append the prediction at once, so an
   interrupted run resumes where it stopped;
3. score the predictions file with the benchmark's official scorer and write
   ``scores.json`` and ``scores.md``.

Runners are model-agnostic: a model enters only through ``generate_fn`` (greedy decoding is
the caller's contract) and a tokenizer used to measure and cut prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

GenerateFn = Callable[[str, int], str]
"""``generate_fn(prompt_text, max_new_tokens) -> completion``; must decode greedily."""

ChatTemplate = Callable[[str], str]
"""Wraps a finished (already truncated) prompt in the model's chat format."""


class TokenizerLike(Protocol):
    """What truncation needs; a Hugging Face tokenizer satisfies it.

    ``encode`` must add special tokens the way ``tokenizer(prompt)`` does, since the official
    code measures the prompt that way; ``decode`` must accept ``skip_special_tokens``.
    """

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class DataFormatError(ValueError):
    """A benchmark or predictions file that does not have the official format."""


class RunSettingsMismatchError(ValueError):
    """An output folder holds predictions made with other settings (nothing was changed in it)."""


@dataclass(frozen=True)
class Sample:
    """One benchmark record with where it came from, so errors and ids can point back to it."""

    id: str
    path: Path
    line: int
    fields: dict[str, Any]


@dataclass
class BenchmarkResult:
    """Per-subset scores (100 x mean, rounded to 2 decimals as the official scripts do)."""

    benchmark: str
    scores: dict[str, float]
    counts: dict[str, int]
    average: float
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "scores": self.scores,
            "average": self.average,
            "counts": self.counts,
            "settings": self.settings,
        }


# ----------------------------------------------------------------------------- JSONL


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)``; blank lines are skipped, line numbers start at 1."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}, line {line_no}: not valid JSON ({err.msg})"
                ) from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}, line {line_no}: expected a JSON object")
            yield line_no, record


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line and flush, so a crash loses at most this record."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def require_file(path: Path, what: str) -> Path:
    """Fail early, naming the file and what it should be, instead of deep inside a run."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


FieldSpec = Mapping[str, "type | tuple[type, ...]"]
"""Field name -> accepted type(s), checked with ``isinstance``."""


def check_fields(
    record: Mapping[str, Any],
    path: Path,
    line: int,
    spec: FieldSpec,
    optional: FieldSpec | None = None,
) -> None:
    """Raise a DataFormatError naming file, line and field for a missing or mistyped field.

    Fields in ``optional`` may be absent, but must have the given type when present.
    """
    optional = optional or {}
    for name, expected in {**spec, **optional}.items():
        if name not in record:
            if name in optional:
                continue
            raise DataFormatError(f"{path}, line {line}: missing field {name!r}")
        if not isinstance(record[name], expected):
            raise DataFormatError(
                f"{path}, line {line}: field {name!r} should be {_type_names(expected)}, "
                f"got {type(record[name]).__name__}"
            )


def check_str_list(record: Mapping[str, Any], name: str, path: Path, line: int) -> None:
    """Answers are lists of strings; a bare string would be scored character by character."""
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataFormatError(f"{path}, line {line}: field {name!r} should be a list of strings")


def _type_names(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def load_samples(
    path: Path,
    *,
    what: str,
    fields: FieldSpec,
    optional: FieldSpec | None = None,
    list_fields: Sequence[str] = (),
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Read and validate a benchmark file; ids come from ``id_field`` or the line number.

    Line numbers are stable ids for files without one (LV-Eval), so resuming still works.
    Duplicate ids are rejected: they would make resume silently skip a sample.
    """
    require_file(path, what)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line, record in iter_jsonl(path):
        check_fields(record, path, line, fields, optional)
        for name in list_fields:
            check_str_list(record, name, path, line)
        sample_id = str(record[id_field]) if id_field is not None else str(line)
        if sample_id in seen:
            raise DataFormatError(
                f"{path}, line {line}: duplicate id {sample_id!r} (first on line {seen[sample_id]})"
            )
        seen[sample_id] = line
        samples.append(Sample(id=sample_id, path=path, line=line, fields=record))
        if limit is not None and len(samples) >= limit:
            break
    return samples


# ----------------------------------------------------------------------------- prompts


def middle_truncate(
    text: str,
    tokenizer: TokenizerLike,
    max_length: int,
    *,
    style: Literal["longbench", "infinitebench"] = "longbench",
) -> str:
    """Keep the first and last ``max_length // 2`` tokens when the text is longer than that.

    The instructions sit at both ends of every official prompt, so the middle of the context
    is what goes. The two official implementations differ in details that can change the text:

    - ``"longbench"`` (LongBench ``pred.py``, LV-Eval ``truncate_prompt``): a prompt within the
      budget is returned untouched; otherwise the two halves are decoded separately and the
      strings concatenated.
    - ``"infinitebench"`` (``truncate_by_tokens``): the kept tokens are decoded as one list,
      and the prompt is *always* decoded back from its tokens, even when nothing was cut
      (so the tokenizer's decode clean-up applies to every prompt).
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if style not in ("longbench", "infinitebench"):
        raise ValueError(f"style must be 'longbench' or 'infinitebench', got {style!r}")
    tokens = list(tokenizer.encode(text))
    if len(tokens) > max_length:
        half = max_length // 2
        head, tail = tokens[:half], tokens[len(tokens) - half :]
    elif style == "longbench":
        return text
    else:
        head, tail = tokens, []
    if style == "longbench":
        return tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(
            tail, skip_special_tokens=True
        )
    return tokenizer.decode(head + tail, skip_special_tokens=True)


def hf_chat_template(tokenizer: Any, **template_kwargs: Any) -> ChatTemplate:
    """A ChatTemplate from a Hugging Face tokenizer: one user turn plus the generation prompt.

    Extra keyword arguments go to ``apply_chat_template`` (e.g. ``enable_thinking=False`` for
    Qwen3, whose thinking block would otherwise eat the small answer budgets).
    """

    def apply(prompt: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            **template_kwargs,
        )

    return apply


# ----------------------------------------------------------------------------- running


def read_predictions(path: Path, list_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a predictions file, repairing a final line torn by an interrupted write.

    Only the last line may be incomplete (records are appended one line at a time); it is cut
    off so that the sample is simply generated again. Anything else malformed is an error.
    Every record needs ``id`` and ``pred``, plus the string lists named in ``list_fields``
    (the gold answers the scorer reads).
    """
    if not path.exists():
        return []
    _repair_last_line(path)
    records = []
    for line, record in iter_jsonl(path):
        check_fields(
            record, path, line, {"id": str, "pred": str, **dict.fromkeys(list_fields, list)}
        )
        for name in list_fields:
            check_str_list(record, name, path, line)
        records.append(record)
    return records


def keep_ids(records: list[dict[str, Any]], ids: Sequence[str] | None) -> list[dict[str, Any]]:
    """Records of the given sample ids only (all when ``ids`` is None), in file order.

    A run scores the samples it was asked for, even when the folder holds more predictions
    (an earlier run without ``limit``, say).
    """
    if ids is None:
        return records
    wanted = set(ids)
    return [record for record in records if record["id"] in wanted]


def _repair_last_line(path: Path) -> None:
    """Terminate a complete last line, or cut off a torn one (see ``read_predictions``)."""
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return
    cut = raw.rfind(b"\n") + 1
    try:
        json.loads(raw[cut:])
    except ValueError:
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        return
    with open(path, "ab") as handle:
        handle.write(b"\n")


def predict(
    samples: Sequence[Sample],
    preds_path: Path,
    generate_fn: GenerateFn,
    *,
    build_prompt: Callable[[Sample], str],
    max_new_tokens: int,
    make_record: Callable[[Sample, str], dict[str, Any]],
) -> int:
    """Generate for every sample whose id is not yet in ``preds_path``; return how many ran."""
    preds_path.parent.mkdir(parents=True, exist_ok=True)
    done = {record["id"] for record in read_predictions(preds_path)}
    generated = 0
    for sample in samples:
        if sample.id in done:
            continue
        prediction = generate_fn(build_prompt(sample), max_new_tokens)
        append_jsonl(
            preds_path, {"id": sample.id, "pred": prediction, **make_record(sample, prediction)}
        )
        done.add(sample.id)
        generated += 1
    return generated


def predict_subsets(
    out_dir: Path,
    benchmark: str,
    data: Mapping[str, Sequence[Sample]],
    generate_fn: GenerateFn,
    settings: Mapping[str, Any],
    *,
    build_prompt: Callable[[Sample, str], str],
    max_new_tokens: Mapping[str, int],
    make_record: Callable[[Sample, str], dict[str, Any]],
    file_stem: Callable[[str], str] = lambda subset: subset,
) -> dict[str, list[str]]:
    """The shared body of every runner: guard the settings, predict each subset resumably,
    and return the ids asked for per subset (so a ``limit`` scores only those)."""
    check_run_settings(out_dir, {"benchmark": benchmark, **settings})
    for subset, samples in data.items():
        predict(
            samples,
            subset_preds_path(out_dir, file_stem(subset)),
            generate_fn,
            build_prompt=lambda s, subset=subset: build_prompt(s, subset),
            max_new_tokens=max_new_tokens[subset],
            make_record=make_record,
        )
    return {subset: [s.id for s in samples] for subset, samples in data.items()}


def check_run_settings(out_dir: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to resume into a folder whose predictions were made with other settings.

    Predictions are reused by id, so a changed max_length or chat template would otherwise
    mix two configurations in one score without any sign of it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run_settings.json"
    current = json.loads(json.dumps(dict(settings)))  # normalise tuples etc. as JSON would
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != current:
            raise RunSettingsMismatchError(
                f"{out_dir} holds predictions made with other settings ({previous}); now "
                f"{current}. Use another output folder or delete {path} and the predictions."
            )
        return
    path.write_text(json.dumps(current, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- results


def mean_percent(scores: Sequence[float]) -> float:
    """100 x mean, rounded to 2 decimals (the official ``round(100 * total / n, 2)``)."""
    if not scores:
        return 0.0
    return round(100 * sum(scores) / len(scores), 2)


def average(scores: Mapping[str, float]) -> float:
    """Plain mean of the per-subset scores, as the paper's "Average" rows."""
    if not scores:
        return 0.0
    return round(sum(scores.values()) / len(scores), 2)


def format_table(columns: Mapping[str, Mapping[str, float]], *, row_label: str = "subset") -> str:
    """Markdown table with one row per subset and one column per run (e.g. per model).

    Rows keep the first-seen order across columns; a run without a value shows "-".
    """
    rows: list[str] = []
    for values in columns.values():
        rows.extend(name for name in values if name not in rows)
    header = f"| {row_label} | " + " | ".join(columns) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in columns) + " |"
    lines = [header, rule]
    for name in rows:
        cells = [f"{values[name]:.2f}" if name in values else "-" for values in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(result: BenchmarkResult, *, run_name: str = "score") -> None:
    """Write ``scores.json`` and ``scores.md`` (subsets then the average) into ``out_dir``."""
    result.out_dir.mkdir(parents=True, exist_ok=True)
    (result.out_dir / "scores.json").write_text(
        json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    column = {**result.scores, "average": result.average}
    (result.out_dir / "scores.md").write_text(format_table({run_name: column}), encoding="utf-8")


def subset_preds_path(out_dir: Path, subset: str) -> Path:
    return Path(out_dir) / f"{subset}.jsonl"
