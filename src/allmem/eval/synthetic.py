"""The synthetic long-context suite: passkey and RULER tasks at any length, no download.

Run::

    result = run_synthetic(system, ["passkey", "niah_single_1"], lengths=[1024, 4096],
                           depths=[0.0, 0.5, 1.0], samples_per_cell=2, out_dir="runs/syn/full")

Prompts come from ``allmem.eval.ruler.make_synthetic_example`` (RULER's templates, needles and
haystacks; lengths measured with the system's tokenizer). Each (task, length, depth, sample)
is one deterministic example: its id names the cell and its random seed derives from the id,
so a rerun regenerates the same prompt and an interrupted run resumes where it stopped
(predictions are appended to ``predictions.jsonl`` one line at a time).

With ``chat`` the prompt is the example's ``input`` as a user turn in the tokenizer's chat
template followed by RULER's answer prefix (RULER's setup for chat models); without it the
text is ``input + answer_prefix`` as a plain completion.

Scoring (RULER ``scripts/eval/synthetic/constants.py``): predictions are stripped and control
characters replaced by newlines; every RULER task here is scored with ``string_match_all``
(the fraction of gold strings found in the prediction, case-insensitively); RULER's QA tasks
would use ``string_match_part`` (1 if any gold string is found). The passkey scores 1 when the
first integer of the prediction equals the key (EVAL_SPEC.md). Cells score 100 x mean.

(ours) Passkey predictions also get a partial score, the share of the key's digits that the
first integer of the prediction has in the right place (``passkey_digits``): a memory that
returns 89636 for 89836 is closer than one that returns no number, and exact match alone
cannot tell them apart.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import append_jsonl, check_run_settings, format_table, keep_ids, read_predictions
from .ruler import DEPTH_TASKS, MAX_NEW_TOKENS, SYNTHETIC_TASKS, TASK_METRIC, make_synthetic_example

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PREDICTIONS = "predictions.jsonl"

_CONTROL = re.compile(r"[\x00-\x1f]")


# ----------------------------------------------------------------------------- scoring


def postprocess_pred(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters -> newline, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of the fraction of gold strings contained in the prediction
    (case-insensitive), x 100, rounded to 2 decimals."""
    if not preds:
        return 0.0
    total = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs, strict=True))
    return round(100 * total / len(preds), 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of 1 if any gold string is contained in the prediction, x 100."""
    if not preds:
        return 0.0
    total = sum(max(float(r.lower() in p.lower()) for r in ref) for p, ref in zip(preds, refs, strict=True))
    return round(100 * total / len(preds), 2)


def passkey_score(prediction: str, key: str) -> float:
    """1.0 when the first integer in the prediction equals the pass key."""
    match = re.search(r"\d+", prediction)
    return float(match is not None and int(match.group()) == int(key))


def passkey_digits(prediction: str, key: str) -> float:
    """Share of positions where the first integer in the prediction has the key's digit, over
    the longer of the two (a dropped or extra digit shifts the rest and counts against it);
    0.0 without an integer. Leading zeros are ignored on both sides, as in ``passkey_score``."""
    match = re.search(r"\d+", prediction)
    if match is None:
        return 0.0
    got, want = str(int(match.group())), str(int(key))
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def sample_score(metric: str, prediction: str, outputs: Sequence[str]) -> float:
    """One prediction's score in [0, 1] under ``metric``."""
    prediction = postprocess_pred(prediction)
    if metric == "passkey":
        return passkey_score(prediction, outputs[0])
    if metric == "string_match_all":
        return sum(r.lower() in prediction.lower() for r in outputs) / len(outputs)
    if metric == "string_match_part":
        return max(float(r.lower() in prediction.lower()) for r in outputs)
    raise ValueError(f"unknown metric {metric!r}")


# ----------------------------------------------------------------------------- cells


def depth_label(depth: float | None) -> str:
    return "-" if depth is None else f"{depth:.2f}"


@dataclass(frozen=True)
class Cell:
    """One example of the grid: which task, length, depth and sample number."""

    task: str
    length: int
    depth: float | None
    sample: int

    @property
    def id(self) -> str:
        return f"{self.task}|{self.length}|{depth_label(self.depth)}|{self.sample}"

    def rng(self, seed: int) -> random.Random:
        return random.Random(f"{seed}|{self.id}")


def plan_cells(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
               samples_per_cell: int) -> list[Cell]:
    """The grid. Tasks without a needle (cwe, fwe) ignore depth and get as many samples per
    length as the others (samples_per_cell x number of depths), with depth "-"."""
    for task in tasks:
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(SYNTHETIC_TASKS)}")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must lie in [0, 1], got {depth}")
    if samples_per_cell <= 0 or not depths or not lengths:
        raise ValueError("need at least one length, one depth and one sample per cell")
    cells = []
    for task in tasks:
        for length in lengths:
            if task in DEPTH_TASKS:
                cells += [Cell(task, length, d, i) for d in depths for i in range(samples_per_cell)]
            else:
                cells += [Cell(task, length, None, i) for i in range(samples_per_cell * len(depths))]
    return cells


# ----------------------------------------------------------------------------- running


@dataclass
class SyntheticResult:
    """Scores (100 x mean) by task and length, and by task, depth and length."""

    system: str
    scores: dict[str, dict[int, float]]
    by_depth: dict[str, dict[str, dict[int, float]]]
    counts: dict[str, dict[int, int]]
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    margins: dict[str, dict[int, float]] = field(default_factory=dict)
    """Mean recall margin (nats) by task and length, where it was recorded (``margin=True``)."""
    digits: dict[str, dict[int, float]] = field(default_factory=dict)
    """Passkey only: 100 x the mean share of the key's digits in place (``passkey_digits``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "scores": {t: {str(k): v for k, v in row.items()} for t, row in self.scores.items()},
            "by_depth": {t: {d: {str(k): v for k, v in row.items()} for d, row in rows.items()}
                         for t, rows in self.by_depth.items()},
            "counts": {t: {str(k): v for k, v in row.items()} for t, row in self.counts.items()},
            "settings": self.settings,
            "margins": {t: {str(k): v for k, v in row.items()} for t, row in self.margins.items()},
            "digits": {t: {str(k): v for k, v in row.items()} for t, row in self.digits.items()},
        }

    def markdown(self) -> str:
        lengths = sorted({n for row in self.scores.values() for n in row})
        columns = {str(n): {t: row[n] for t, row in self.scores.items() if n in row} for n in lengths}
        if len(self.scores) > 1:
            for n in lengths:
                values = list(columns[str(n)].values())
                columns[str(n)]["average"] = round(sum(values) / len(values), 2)
        out = [f"### {self.system}\n", "Score (100 x mean) by task and length (tokens):\n", format_table(columns, row_label="task")]
        for task, rows in self.by_depth.items():
            if task not in DEPTH_TASKS:
                continue
            depth_cols = {str(n): {d: row[n] for d, row in rows.items() if n in row} for n in lengths}
            out += [f"\n{task} by needle depth (0 = start of the context) and length:\n",
                    format_table(depth_cols, row_label="depth")]
        if self.margins:
            cols = {str(n): {t: row[n] for t, row in self.margins.items() if n in row} for n in lengths}
            out += ["\nRecall margin, mean log p(right) - log p(wrong) in nats, by task and length:\n",
                    format_table(cols, row_label="task")]
        if self.digits:
            cols = {str(n): {t: row[n] for t, row in self.digits.items() if n in row} for n in lengths}
            out += ["\nKey digits in place (100 x mean share), by task and length:\n", format_table(cols, row_label="task")]
        return "\n".join(out)


def prompt_text(system: Any, example: Any, chat: bool) -> str:
    """The text a system generates from: chat-formatted user turn + answer prefix, or plain."""
    if chat:
        return system.format_chat(example.input) + example.answer_prefix.lstrip()
    return example.prompt


def example_margin(system: Any, text: str, answer: str, rng: random.Random) -> float:
    """Recall margin (nats) of ``answer`` after the prompt ``text`` against a corrupted answer."""
    from .recall import answer_token_pair, recall_margins, system_logprob_fn

    pair = answer_token_pair(system.tokenizer, " " + answer, rng)
    if pair is None:
        raise ValueError(f"no same-length wrong answer for {answer!r}")
    return recall_margins(system_logprob_fn(system), [(system.encode(text), *pair)]).mean


def run_synthetic(
    system: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples_per_cell: int = 1,
    out_dir: str | Path = "runs/synthetic",
    *,
    chat: bool | None = None,
    max_new_tokens: int | Mapping[str, int] | None = None,
    seed: int = 0,
    split: str = "all",
    progress: bool = True,
    margin: bool = False,
) -> SyntheticResult:
    """Generate (resuming) and score the grid tasks x lengths x depths x samples for one system.

    ``system`` needs ``name``, ``tokenizer``, ``generate(text, max_new_tokens, chat=False)`` and,
    for chat, ``format_chat(text)`` (an ``allmem.eval.systems.System``). ``chat=None`` uses the
    chat template when the tokenizer has one. ``max_new_tokens`` overrides RULER's per-task
    budgets (one number for all tasks or a task -> number mapping). ``split`` picks the essays
    of the essay haystacks. Writes ``predictions.jsonl``, ``scores.json`` and ``scores.md`` into
    ``out_dir``; a folder whose predictions were made with other settings is refused.
    ``margin`` also records the recall margin of each example whose single gold answer has
    digits (``allmem.eval.recall``: log p(right) - log p(same-form wrong answer); continuous
    where accuracy is 0/1; two more scoring passes per prompt).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    tokenizer = system.tokenizer
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    budgets = dict(MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, int):
        budgets = dict.fromkeys(budgets, max_new_tokens)
    elif max_new_tokens is not None:
        budgets.update(max_new_tokens)
    cells = plan_cells(tasks, lengths, depths, samples_per_cell)
    # what would change a prompt or a prediction; tasks, lengths, depths and samples are not here:
    # they only add cells (ids), so a folder can grow with more of them
    settings = {"benchmark": "synthetic", "system": system.name, "chat": chat, "seed": seed, "split": split,
                "max_new_tokens": max_new_tokens if isinstance(max_new_tokens, (int, type(None))) else dict(max_new_tokens)}
    check_run_settings(out_dir, settings)
    path = out_dir / PREDICTIONS
    done = {r["id"] for r in read_predictions(path, ("outputs",))}
    todo = [c for c in cells if c.id not in done]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"synthetic {system.name}", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    for cell in todo:
        example = make_synthetic_example(cell.task, tokenizer, cell.length, cell.rng(seed), depth=cell.depth,
                                         split=split)
        text = prompt_text(system, example, chat)
        prediction = system.generate(text, budgets[cell.task], chat=False)
        extra = {}
        if margin and len(example.outputs) == 1 and any(c.isdigit() for c in example.outputs[0]):
            extra["margin"] = example_margin(system, text, example.outputs[0], cell.rng(seed))
        append_jsonl(path, {**extra,
            "id": cell.id, "pred": prediction, "task": cell.task, "length": cell.length,
            "depth": cell.depth, "sample": cell.sample, "outputs": example.outputs,
            "prompt_tokens": example.length, "max_new_tokens": budgets[cell.task], "metric": TASK_METRIC[cell.task],
            "score": sample_score(TASK_METRIC[cell.task], prediction, example.outputs),
        })
        bar.update(1)
        bar.set_postfix(task=cell.task, length=cell.length)
    bar.close()
    return score_synthetic(out_dir, system.name, cells, settings=settings)


def score_synthetic(out_dir: str | Path, system_name: str, cells: Sequence[Cell] | None = None, *,
                    settings: dict[str, Any] | None = None) -> SyntheticResult:
    """Score ``predictions.jsonl`` (only the given cells, when given); write scores.json/.md."""
    out_dir = Path(out_dir)
    records = read_predictions(out_dir / PREDICTIONS, ("outputs",))
    records = keep_ids(records, None if cells is None else [c.id for c in cells])
    sums: dict[str, dict[int, list[float]]] = {}
    depth_sums: dict[str, dict[str, dict[int, list[float]]]] = {}
    margin_sums: dict[str, dict[int, list[float]]] = {}
    digit_sums: dict[str, dict[int, list[float]]] = {}
    for r in records:
        value = sample_score(TASK_METRIC[r["task"]], r["pred"], r["outputs"])
        sums.setdefault(r["task"], {}).setdefault(r["length"], []).append(value)
        depth_sums.setdefault(r["task"], {}).setdefault(depth_label(r["depth"]), {}).setdefault(r["length"], []).append(value)
        if "margin" in r:
            margin_sums.setdefault(r["task"], {}).setdefault(r["length"], []).append(r["margin"])
        if TASK_METRIC[r["task"]] == "passkey":
            digit = passkey_digits(postprocess_pred(r["pred"]), r["outputs"][0])
            digit_sums.setdefault(r["task"], {}).setdefault(r["length"], []).append(digit)
    mean = lambda xs: round(100 * sum(xs) / len(xs), 2)  # noqa: E731
    order = {t: i for i, t in enumerate(SYNTHETIC_TASKS)}
    scores = {t: {n: mean(v) for n, v in sorted(rows.items())} for t, rows in sorted(sums.items(), key=lambda x: order[x[0]])}
    counts = {t: {n: len(v) for n, v in sorted(rows.items())} for t, rows in sums.items()}
    by_depth = {t: {d: {n: mean(v) for n, v in sorted(rows.items())} for d, rows in sorted(depths.items())}
                for t, depths in depth_sums.items()}
    margins = {t: {n: round(sum(v) / len(v), 3) for n, v in sorted(rows.items())} for t, rows in margin_sums.items()}
    digits = {t: {n: mean(v) for n, v in sorted(rows.items())} for t, rows in digit_sums.items()}
    result = SyntheticResult(system_name, scores, by_depth, counts, out_dir, settings or {}, margins, digits)
    (out_dir / "scores.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "scores.md").write_text(result.markdown(), encoding="utf-8")
    return result


def comparison_markdown(results: Sequence[SyntheticResult]) -> str:
    """Systems side by side: one row per task and length, then passkey (and other needle
    tasks) by depth and length."""
    columns = {r.system: {f"{t} @ {n}": v for t, row in r.scores.items() for n, v in row.items()} for r in results}
    out = ["Score (100 x mean) by task and length (tokens):\n", format_table(columns, row_label="task @ length")]
    if any(r.margins for r in results):
        margins = {r.system: {f"{t} @ {n}": v for t, row in r.margins.items() for n, v in row.items()} for r in results}
        out += ["\nRecall margin (nats, mean log p(right) - log p(wrong answer of the same form)):\n",
                format_table(margins, row_label="task @ length")]
    if any(r.digits for r in results):
        digits = {r.system: {f"{t} @ {n}": v for t, row in r.digits.items() for n, v in row.items()} for r in results}
        out += ["\nKey digits in place (100 x mean share of the key's digits at the right position):\n",
                format_table(digits, row_label="task @ length")]
    depth_tasks = [t for t in DEPTH_TASKS if any(t in r.by_depth for r in results)]
    for task in depth_tasks:
        cols = {r.system: {f"{n} @ depth {d}": v for d, row in r.by_depth.get(task, {}).items() for n, v in sorted(row.items())}
                for r in results}
        # order rows by length, then depth
        rows = sorted({k for c in cols.values() for k in c}, key=lambda k: (int(k.split(" @ ")[0]), k))
        cols = {name: {k: c[k] for k in rows if k in c} for name, c in cols.items()}
        out += [f"\n{task} by length and needle depth (0 = start of the context):\n",
                format_table(cols, row_label="length @ depth")]
    return "\n".join(out)
