"""Recipes: a distillation run as data (YAML or TOML), with ``key.sub=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import AllMemConfig, ConfigError
from ..constants import DEFAULT_BASE, DTYPE_NAMES, PACKAGE_DIR

RECIPE_DIR = PACKAGE_DIR / "recipes"
"""The built-in recipes (and accelerate configs under ``accelerate/``), shipped inside the package."""


@dataclass
class TrainSettings:
    steps: int = 100
    micro_batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    """Warmup-stable-decay (transformers' ``get_wsd_schedule``): linear warmup from lr 0 over
    ``warmup_steps`` (so step 1 has lr 0), then constant, then the last ``decay_fraction`` of
    the steps decay linearly to 0."""
    grad_clip: float = 1.0
    alpha_lr_mult: float = 1.0
    """(ours) learning-rate multiplier for the fusion scale alpha, which starts at 0."""
    eta_lr_mult: float = 1.0
    """(ours) learning-rate multiplier for the write gates (the eta heads, eta_proj). A fact survives
    hundreds of later writes only if the filler writes far less than the fact (a 100x lower eta on
    the filler keeps a needle's value at cosine 0.33 after 488 tokens where a uniform eta keeps
    0.07: benchmarks/needle_retention.py), and the gate starts uniform, so it has the most to learn."""
    lambda_kl: float = 1.0
    lambda_ce: float = 0.0
    lambda_gate: float = 0.0
    """(ours) weight of the write-gate loss (``allmem.distill.losses.write_gate_loss``) on samples
    whose answer's tokens appear in their context (the built-in recall tasks): it pushes each
    memory's eta on those tokens to ``gate_ratio`` times its eta on the rest of the context. A
    uniform gate lets ~700 filler writes erase a needle (benchmarks/needle_retention.py), and
    answer CE alone left the gates uniform or writing the filler more (runs v5-v8)."""
    gate_ratio: float = 100.0
    """(ours) the needle / filler eta ratio the write-gate loss aims at (> 1)."""
    lambda_order: float = 0.0
    """(ours) weight of the answer-order loss (``allmem.distill.losses.answer_order_loss``) on the samples
    of data sources with their own ``lambda_ce`` > 0 (known answers, the recall tasks): at each answer
    token, the token that follows it in the answer is pushed ``order_margin`` nats below the right one.
    The recall runs' wrong answers swap a code's last two digits or drop one (v15, v16): both emit the
    next digit too early. At 0.5 (run v18) the digits repeated instead and recall fell (docs/distill/recall)."""
    order_margin: float = 2.0
    """(ours) the margin, in nats, of the answer-order loss."""
    lambda_transfer: float = 0.0
    """(ours, after LoLCATs' attention transfer) weight of a per-layer loss: each converted layer's
    output (window + alpha * memory) is fit to what the pretrained full attention returns on the same
    inputs (``allmem.distill.losses.attention_transfer_loss``, mean over layers). It tells every memory
    directly what its window lost, where the logit KL and the answer CE reach it only through the layers
    above; runs v5-v9 left the answer CE at ~1.8 nats with gates that already single the needle out."""
    lambda_needle: float = 0.0
    """(ours) weight of the needle-specific transfer loss (``allmem.distill.losses.needle_transfer_loss``)
    on recall samples whose needles hold digits: at the answer, each layer's *change* of output between
    the sample and a counterfactual with another code must match the pretrained attention's change.
    Costs one more forward (no gradient) of those samples. The plain transfer loss is met by what every
    code shares: run v11 matched the full attention's output at the answer to 2-3 % in layers 6-8 while
    its code-dependent part was further off than passing nothing (benchmarks/transfer_gap.py)."""
    transfer_norm: str = "target"
    """(ours) what the attention-transfer error of a layer is divided by: ``target``, the full
    attention's output (the relative error); ``window``, the window attention's own error, so that
    each layer is scored on the share of its window's loss it still has. With ``target`` the layers
    whose window loses little add almost nothing to the loss, and run v10's memory added error in them
    (layer 23 at the answer: 0.06 -> 2.3, docs/distill/recall/transfer_gap)."""
    kl_chunk: int = 1024
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 25
    save_total_limit: int = 0
    """Keep only the newest this many checkpoints (0: every one, as transformers' Trainer's
    ``save_total_limit``); at least 2, so that a resume finding the newest damaged has one to fall
    back to. A checkpoint of SmolLM2's memory with its optimizer state is ~200 MB: a run of 1,000
    steps saved every 10 fills 20 GB when every one is kept."""
    eval_every: int = 50
    output_dir: str = "out/distill"
    teacher_cache: str | None = None
    teacher_topk: int = 64
    max_bad_steps: int = 5
    """A step whose loss or gradient is not finite is skipped (and logged); this many in a row
    stop the run with an error, keeping the last good checkpoint."""
    init_adapter: str | None = None
    """Warm start: an adapter (shipped name or directory) loaded into the memory before step 0."""
    reset_control_heads: bool = False
    """After the warm start, put the eta / beta heads back at the recipe's base_lr / momentum_init
    (e.g. when the adapter's heads were learned under other inner-loop settings)."""
    recall_prompts: int = 0
    """Held-out passkey / multi-key prompts whose recall margin is logged at every evaluation."""
    recall_length: int = 1024


def _check_types(settings: TrainSettings) -> None:
    """Every train setting has its declared type (YAML's ``true`` or ``2.5`` for ``steps`` is refused)."""
    import types
    import typing

    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(settings):
        value, hint = getattr(settings, f.name), hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = typing.get_args(hint) if union else (hint,)
        ok = False
        for kind in allowed:
            kind = typing.get_origin(kind) or kind
            if kind is type(None):
                ok = ok or value is None
            elif kind is float:
                ok = ok or (isinstance(value, (int, float)) and not isinstance(value, bool))
            elif kind is int:
                ok = ok or (isinstance(value, int) and not isinstance(value, bool))
            elif kind is tuple:
                ok = ok or (isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
            else:
                ok = ok or isinstance(value, kind)
        if not ok:
            names = " or ".join("None" if k is type(None) else getattr(typing.get_origin(k) or k, "__name__", str(k))
                                for k in allowed)
            raise ConfigError(f"train.{f.name} must be {names}, got {value!r}")


@dataclass
class Recipe:
    name: str = "custom"
    base: str = DEFAULT_BASE
    dtype: str = "float32"
    allmem: dict[str, Any] = field(default_factory=dict)
    randomize: dict[str, list[int]] = field(default_factory=dict)
    """Ranges [lo, hi] (inclusive) for window, sinks, chunk drawn independently every step."""
    data: list[dict[str, Any]] = field(default_factory=list)
    """Sources mixed by their counts: {source: tasks|text|file, count|path, lengths|max_len}; a tasks
    source may set write_marks: facts (default) or answer, the tokens its write-gate masks mark."""
    heldout: list[dict[str, Any]] = field(default_factory=list)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            known = {f.name for f in dataclasses.fields(TrainSettings)}
            unknown = sorted(set(self.train) - known)
            if unknown:
                raise ConfigError(f"unknown train settings {unknown}; known: {sorted(known)}")
            self.train = TrainSettings(**self.train)
        _check_types(self.train)
        self.train.betas = tuple(self.train.betas)  # as the default is, whether YAML gave a list or not
        self.allmem_config()  # validate early
        for key, bounds in self.randomize.items():
            if key not in ("window", "sinks", "chunk"):
                raise ConfigError(f"randomize.{key}: only window, sinks and chunk can be randomised")
            if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and 0 <= bounds[0] <= bounds[1]):
                raise ConfigError(f"randomize.{key} must be [lo, hi] with 0 <= lo <= hi, got {bounds!r}")
        if not self.data:
            raise ConfigError("the recipe has no data sources (data: [...])")
        from ..corpus import TEXT_SOURCES
        from .tasks import TRAIN_TASKS

        for i, src in enumerate(self.data + self.heldout):
            if src.get("source") not in ("tasks", "text", "file"):
                raise ConfigError(f"data[{i}].source must be tasks, text or file, got {src.get('source')!r}")
            bad = sorted(set(src.get("tasks", ())) - set(TRAIN_TASKS))
            if bad:
                raise ConfigError(f"data[{i}].tasks: unknown tasks {bad}; choose from {list(TRAIN_TASKS)}")
            bad = sorted(set(src.get("sources", ())) - set(TEXT_SOURCES))
            if bad:
                raise ConfigError(f"data[{i}].sources: unknown text sources {bad}; choose from {list(TEXT_SOURCES)}")
            if src.get("write_marks", "facts") not in ("facts", "answer"):
                raise ConfigError(f"data[{i}].write_marks must be facts (every stated candidate) or answer "
                                  f"(only the asked one), got {src['write_marks']!r}")
            weight = src.get("lambda_ce", 0.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
                raise ConfigError(f"data[{i}].lambda_ce must be a number >= 0, got {weight!r}")
        t = self.train
        if t.steps <= 0 or t.micro_batch <= 0 or t.grad_accum <= 0:
            raise ConfigError("train.steps, train.micro_batch and train.grad_accum must be positive")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(t.betas)!r}")
        for name in ("lr", "kl_chunk", "teacher_topk", "max_bad_steps"):
            if not getattr(t, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(t, name)!r}")
        for name in ("weight_decay", "warmup_steps", "grad_clip", "alpha_lr_mult", "eta_lr_mult", "lambda_kl",
                     "lambda_ce", "lambda_gate", "lambda_transfer", "lambda_needle", "lambda_order", "order_margin",
                     "save_every", "eval_every", "recall_prompts"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)!r}")
        if t.save_total_limit < 0 or t.save_total_limit == 1:
            raise ConfigError(f"train.save_total_limit must be 0 (keep every checkpoint) or at least 2 (the newest "
                              f"one and one to fall back to), got {t.save_total_limit!r}")
        if t.transfer_norm not in ("target", "window"):
            raise ConfigError(f"train.transfer_norm must be target or window, got {t.transfer_norm!r}")
        if not t.gate_ratio > 1:
            raise ConfigError(f"train.gate_ratio must be > 1 (needle eta over filler eta), got {t.gate_ratio!r}")
        if not 0 <= t.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must lie in [0, 1], got {t.decay_fraction!r}")
        if Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
            raise ConfigError(f"train.output_dir {t.output_dir!r} is a file; choose a directory")
        if t.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {t.mixed_precision!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

    def allmem_config(self) -> AllMemConfig:
        return AllMemConfig.from_dict(self.allmem)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_value(text: str) -> Any:
    for number in (int, float):  # YAML would read 3e-3 as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value (e.g. train.steps=10)")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is not a section")
    node[parts[-1]] = _parse_value(value)


def builtin_recipes() -> list[str]:
    """Names of the recipes in ``RECIPE_DIR`` (what ``--recipe NAME`` accepts)."""
    return sorted(p.stem for p in RECIPE_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".toml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for suffix in (".yaml", ".yml", ".toml"):
        candidate = RECIPE_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no recipe {name_or_path!r}: not a file, and not one of the built-in recipes "
                            f"{builtin_recipes()}")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    data = json.loads(json.dumps(data))  # plain containers
    for o in overrides:
        apply_override(data, o)
    data.setdefault("name", path.stem)
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown recipe keys {unknown}; known: {sorted(known)}")
    return Recipe(**data)
