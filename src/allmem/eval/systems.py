"""Systems under evaluation: anything that can score text and generate from a prompt.

A ``SystemSpec`` names a model and how it attends. On the command line it is written
``KIND:MODEL[?key=value&...]`` (``parse_spec`` reads it, ``str(spec)`` writes it back)::

    full:smollm2                               the base model, full attention (transformers SDPA,
                                               standard KV cache)
    swa:smollm2?window=256&sinks=4             converted, memory off: sliding window + sinks
    allmem:smollm2?window=256&sinks=4&chunk=128    converted, memory on (untrained memory is fine)
    allmem:runs/distill/adapter                a saved adapter (its base is loaded as it names)
    mamba2:smollm2?window=256&sinks=4          the Mamba-2 baseline (memory_type="mamba2")

The part after ``KIND:`` is an embedded model name, a local Hugging Face directory, a hub id
or (``swa``/``allmem``/``mamba2``) an adapter directory. Options after ``?`` (``&``-separated,
taken literally: ``name=SWA + sinks`` is that name, nothing is URL-decoded):

- every system: ``segment`` (tokens per forward when scoring or prefilling; memory use scales
  with it), ``dtype`` (float32 | bfloat16 | float16), ``name`` (the label in tables);
- converted systems: any scalar ``AllMemConfig`` field (``window``, ``sinks``, ``chunk``,
  ``positions``, ``base_lr``, ``init``, ...); on a saved adapter only the runtime fields
  ``window``, ``sinks``, ``chunk``, ``positions`` and ``swa_block`` may change;
- ``swa``: ``skip_memory`` (default 1). With alpha = 0 the memory's output is multiplied by
  zero, so the memory need not run at all: the output is bit-for-bit that of the converted
  model under ``memory_disabled()`` (a test checks it) at about half the cost on CPU.
  ``skip_memory=0`` runs it anyway.

Every system offers ``generate(prompt_text, max_new_tokens, chat)`` (greedy, through the one
decode path ``streaming.continue_text``) and ``token_nlls(input_ids)``. Converted systems read
long inputs segment by segment through their constant-size cache; the full system prefills and
scores in segments with its KV cache, which grows with the input as full attention must.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compat import cache_kwargs
from ..config import AllMemConfig
from ..constants import DTYPE_NAMES, torch_dtype
from ..streaming import continue_text

KINDS = ("full", "swa", "allmem", "mamba2")
_RUNTIME_FIELDS = ("window", "sinks", "chunk", "positions", "swa_block")
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(AllMemConfig) if f.name != "extra"}
_DEFAULT_SEGMENT = {"full": 2048, "swa": 1024, "allmem": 1024, "mamba2": 1024}


class SystemSpecError(ValueError):
    """A system spec that cannot be parsed or does not fit its kind."""


@dataclass(frozen=True)
class SystemSpec:
    """What a system is: a model (``target``) and how it attends (``kind``, ``config``).

    ``config`` holds ``AllMemConfig`` fields with their types (converted kinds only);
    ``segment`` None means 2048 tokens for full attention, 1024 for converted systems;
    ``skip_memory`` (swa only, None = yes) replaces the zero-weighted memory by zeros;
    ``label`` names the system in tables (default: the spec as written). Checked when built.
    """

    kind: str
    target: str
    config: Mapping[str, Any] = field(default_factory=dict)
    segment: int | None = None
    dtype: str = "float32"
    skip_memory: bool | None = None
    label: str | None = None
    text: str | None = field(default=None, compare=False)  # the command-line form it was read from

    def __post_init__(self) -> None:
        where = repr(self.text or f"{self.kind}:{self.target}")
        if self.kind not in KINDS:
            raise SystemSpecError(f"unknown system kind {self.kind!r} in {where}; choose from {', '.join(KINDS)}")
        if not self.target:
            raise SystemSpecError(f"bad system spec {where}: no model after {self.kind}:")
        if self.dtype not in DTYPE_NAMES:
            raise SystemSpecError(f"dtype={self.dtype!r} in {where}: choose from {sorted(DTYPE_NAMES)}")
        if self.segment is not None and (isinstance(self.segment, bool) or not isinstance(self.segment, int)
                                         or self.segment <= 0):
            raise SystemSpecError(f"option segment={self.segment!r} in {where} should be a positive integer")
        allowed = set() if self.kind == "full" else set(_CONFIG_FIELDS)
        unknown = sorted(set(self.config) - allowed)
        if self.skip_memory is not None and self.kind != "swa":
            unknown.append("skip_memory")
        if unknown:
            extra = {"swa": ["skip_memory"]}.get(self.kind, [])
            raise SystemSpecError(f"unknown option(s) {unknown} for a {self.kind} system in {where}; allowed: "
                                  f"{sorted([*allowed, *extra, 'segment', 'dtype', 'name'])}")
        memory_type = self.config.get("memory_type")
        if self.kind == "mamba2" and memory_type not in (None, "mamba2"):
            raise SystemSpecError(f"{where}: a mamba2 system has memory_type=mamba2")
        if self.kind in ("swa", "allmem") and memory_type not in (None, "ttt"):
            raise SystemSpecError(f"{where}: use the mamba2: kind for memory_type=mamba2")

    @property
    def name(self) -> str:
        return self.label or self.text or str(self)

    @property
    def default_segment(self) -> int:
        return self.segment or _DEFAULT_SEGMENT[self.kind]

    @property
    def options(self) -> dict[str, str]:
        """The settings given, as written after ``?`` on the command line."""
        options = {k: _write(v) for k, v in self.config.items()}
        for key, value in (("segment", self.segment), ("skip_memory", self.skip_memory), ("name", self.label)):
            if value is not None:
                options[key] = _write(value)
        if self.dtype != "float32":
            options["dtype"] = self.dtype
        return options

    def __str__(self) -> str:
        """The command-line form; ``parse_spec(str(spec)) == spec``."""
        if "?" in self.target:
            raise SystemSpecError(f"a model path with '?' ({self.target!r}) has no command-line form")
        bad = [f"{k}={v}" for k, v in self.options.items() if "&" in v]
        if bad:
            raise SystemSpecError(f"option value(s) with '&' have no command-line form: {bad}")
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.target}" + (f"?{query}" if query else "")


def _write(value: Any) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def parse_spec(spec: str) -> SystemSpec:
    """The command line's ``KIND:TARGET[?key=value&...]`` -> a checked ``SystemSpec``."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise SystemSpecError(
            f"bad system spec {spec!r}: expected KIND:MODEL[?key=value&...] with KIND one of {', '.join(KINDS)} "
            "(e.g. full:smollm2, swa:smollm2?window=256&sinks=4, allmem:PATH_TO_ADAPTER)"
        )
    target, _, query = rest.partition("?")
    if not target:
        raise SystemSpecError(f"bad system spec {spec!r}: no model after {kind}:")
    options: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SystemSpecError(f"bad option {pair!r} in system spec {spec!r}: write key=value&key=value")
        if key in options:
            raise SystemSpecError(f"option {key!r} given twice in system spec {spec!r}")
        options[key] = value
    segment, skip = options.pop("segment", None), options.pop("skip_memory", None)
    label, dtype = options.pop("name", None), options.pop("dtype", "float32")
    # typed here; a key that is no AllMemConfig field (or any key on full:) is refused by SystemSpec
    config = {k: _coerce(_CONFIG_FIELDS[k], v, spec) if k in _CONFIG_FIELDS and kind != "full" else v
              for k, v in options.items()}
    return SystemSpec(kind, target, config, segment=_positive(segment, "segment", spec), dtype=dtype,
                      skip_memory=None if skip is None else _flag("skip_memory", skip, spec), label=label, text=spec)

def slug(name: str) -> str:
    """A file-name-safe form of a system name (``swa:smollm2?window=256`` -> ``swa_smollm2_window_256``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "system"


def _coerce(field: dataclasses.Field, value: str, spec: str) -> Any:
    """A string option as the type of an AllMemConfig field."""
    kind = str(field.type)
    if value.lower() in ("none", "null") and "None" in kind:
        return None
    for prefix, convert, noun in (("int", int, "an integer"), ("float", float, "a number"), ("bool", _bool, "0 or 1")):
        if kind.startswith(prefix):
            try:
                return convert(value)
            except ValueError:
                raise SystemSpecError(f"option {field.name}={value!r} in {spec!r} should be {noun}") from None
    return value


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _flag(key: str, value: str, spec: str) -> bool:
    try:
        return _bool(value)
    except ValueError:
        raise SystemSpecError(f"{key}={value!r} in {spec!r} should be 0 or 1") from None


def _positive(value: str | None, key: str, spec: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise SystemSpecError(f"option {key}={value!r} in {spec!r} should be an integer") from None
    if number <= 0:
        raise SystemSpecError(f"option {key}={value!r} in {spec!r} should be positive")
    return number


# ------------------------------------------------------------------------------- systems


@dataclass
class TokenScores:
    """Per predicted token (positions 1..L-1 of the input): negative log-likelihood and
    whether the token is the model's greedy (argmax) choice."""

    nll: torch.Tensor  # [L-1] float64
    greedy: torch.Tensor  # [L-1] bool


class System:
    """A model under evaluation. Subclasses say how a new cache is made (``_new_cache``)."""

    kind = "?"

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, *, segment: int):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.segment = segment
        tokenizer.model_max_length = 10**12  # lengths are the caller's choice, not the tokenizer's
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)
        """The base model's trained context (plots mark it); not a limit of the system."""

    # max_length: the longest input the system scores in one piece (lm-eval truncates to it);
    # None = unbounded (the converted systems' state does not grow).
    max_length: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _new_cache(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ text
    def format_chat(self, text: str) -> str:
        """``text`` as one user turn in the tokenizer's chat template, generation prompt added
        (``enable_thinking=False``: Qwen3 would otherwise spend the answer budget thinking; other
        templates ignore it)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name}: the tokenizer has no chat template; run without chat")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: ``tokenizer(text)`` (the tokenizer's own special-token rule), or
        the chat-formatted text (whose template already holds any special tokens)."""
        if chat:
            return list(self.tokenizer(self.format_chat(text), add_special_tokens=False).input_ids)
        return list(self.tokenizer(text).input_ids)

    def _as_ids(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"{self.name}: one sequence at a time, got a batch of {ids.shape[0]}")
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{self.name}: input_ids must be [L] or [1, L], got shape {tuple(ids.shape)}")
        return ids[None].to(self.device)

    # --------------------------------------------------------------- scoring
    @torch.no_grad()
    def token_scores(self, input_ids: Sequence[int] | torch.Tensor, *,
                     on_segment: Callable[[int], None] | None = None) -> TokenScores:
        """Scores of tokens 1..L-1, computed ``segment`` tokens at a time through the system's
        cache; ``on_segment(n)`` is called after each segment of n tokens (progress bars)."""
        ids = self._as_ids(input_ids)
        if ids.shape[1] < 2:
            empty = torch.zeros(0, dtype=torch.float64)
            return TokenScores(empty, torch.zeros(0, dtype=torch.bool))
        nlls, greedy = [], []
        cache = self._new_cache()
        for start in range(0, ids.shape[1], self.segment):
            logits = self.model(ids[:, start : start + self.segment], **cache_kwargs(cache), use_cache=True).logits[0]
            targets = ids[0, start + 1 : start + 1 + logits.shape[0]]
            logits = logits[: targets.shape[0]].float()
            logp = torch.log_softmax(logits, dim=-1)
            nlls.append(-logp.gather(1, targets[:, None])[:, 0].double().cpu())
            greedy.append((logits.argmax(-1) == targets).cpu())
            if on_segment is not None:
                on_segment(min(self.segment, ids.shape[1] - start))
        return TokenScores(torch.cat(nlls), torch.cat(greedy))

    def token_nlls(self, input_ids: Sequence[int] | torch.Tensor, *,
                   on_segment: Callable[[int], None] | None = None) -> torch.Tensor:
        """Negative log-likelihood of tokens 1..L-1 of ``input_ids`` ([L] or [1, L]) -> [L-1]."""
        return self.token_scores(input_ids, on_segment=on_segment).nll

    # ------------------------------------------------------------ generation
    def generate(self, prompt_text: str, max_new_tokens: int, chat: bool = False, *,
                 stop: Sequence[str] | None = None) -> str:
        """Greedy continuation of ``prompt_text`` (wrapped in the chat template when ``chat``),
        without the prompt and special tokens; cut before the first of ``stop`` if given."""
        return self.generate_ids(self.encode(prompt_text, chat=chat), max_new_tokens, stop=stop)

    def generate_ids(self, input_ids: Sequence[int], max_new_tokens: int, *,
                     stop: Sequence[str] | None = None) -> str:
        """Greedy continuation of ``input_ids`` (``streaming.continue_text`` on a new cache)."""
        ids = self._as_ids(input_ids)
        if ids.shape[1] == 0:
            raise ValueError(f"{self.name}: cannot generate from an empty prompt")
        if max_new_tokens <= 0:
            return ""
        return continue_text(self.model, self.tokenizer, ids, self._new_cache(), max_new_tokens=max_new_tokens,
                             stop_strings=stop or (), segment=self.segment).text

    def close(self) -> None:
        """Drop the model (the CLI evaluates systems one after the other)."""
        self.model = None


class FullAttentionSystem(System):
    """The base model as it was trained: transformers SDPA attention with a standard KV cache.

    Inputs are fed ``segment`` tokens at a time with the growing KV cache (the logits of one
    segment and one segment's attention scores are all that is ever materialised beyond the
    cache itself); positions past the trained context simply continue (RoPE extrapolation)."""

    kind = "full"

    @property
    def max_length(self) -> int | None:  # type: ignore[override]
        """lm-eval truncates to the trained context, as its HFLM does for this model."""
        return self.context_length

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)


class _NoMemoryState:
    """The state of a skipped memory: holds nothing, so the cache stays valid (and small)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def map(self, fn: Any) -> "_NoMemoryState":
        return self


class _SkippedMemory(torch.nn.Module):
    """Stands in for a memory whose output is multiplied by alpha = 0: returns zeros."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.zeros_like(x), _NoMemoryState()


class ConvertedSystem(System):
    """An AllMem model (memory on or off): segments through its constant-size cache."""

    def __init__(self, name: str, model: Any, tokenizer: Any, *, segment: int, kind: str):
        super().__init__(name, model, tokenizer, segment=segment)
        self.kind = kind

    def _new_cache(self):
        return self.model.new_cache()


# ------------------------------------------------------------------------------- loading


def _is_adapter(target: str) -> bool:
    from ..modeling import adapter_dir

    return adapter_dir(target) is not None


def load_system(spec: str | SystemSpec, *, device: str | None = None) -> System:
    """Build the system a spec names (see the module docstring); loads weights."""
    from .. import convert, from_pretrained
    from ..loading import load_base

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    where, dtype = repr(spec.text or str(spec)), torch_dtype(spec.dtype)
    if spec.kind == "full":
        if _is_adapter(spec.target):
            raise SystemSpecError(f"{where}: full: takes a base model, not an adapter directory")
        base, tokenizer = load_base(spec.target, dtype=dtype, device=device)
        return FullAttentionSystem(spec.name, base.eval(), tokenizer, segment=spec.default_segment)

    config_options = dict(spec.config)
    if spec.kind == "mamba2":
        config_options["memory_type"] = "mamba2"
    if _is_adapter(spec.target):
        fixed = sorted(set(config_options) - set(_RUNTIME_FIELDS) - {"memory_type"})
        if fixed:
            raise SystemSpecError(
                f"{where}: a saved adapter fixes {fixed}; only {list(_RUNTIME_FIELDS)} can change at run time"
            )
        model = from_pretrained(spec.target, dtype=dtype, device=device)
        saved_type = model.allmem_config.memory_type
        wanted_type = "mamba2" if spec.kind == "mamba2" else saved_type if spec.kind == "swa" else "ttt"
        if saved_type != wanted_type:
            raise SystemSpecError(f"{where}: the adapter's memory_type is {saved_type!r}; use {saved_type}: for it")
        runtime = {k: v for k, v in config_options.items() if k in _RUNTIME_FIELDS}
        if runtime:
            model.set_runtime(**runtime)
        tokenizer = model.tokenizer
    else:
        config = AllMemConfig(**config_options)
        base, tokenizer = load_base(spec.target, dtype=dtype, device=device)
        torch.manual_seed(0)  # init="random" memories are reproducible
        model = convert(base, config, base_name=spec.target).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.kind == "swa":
        disable_memory(model, skip=spec.skip_memory is not False)
    return ConvertedSystem(spec.name, model, tokenizer, segment=spec.default_segment, kind=spec.kind)


def disable_memory(model: Any, *, skip: bool = True) -> None:
    """Turn a converted model into SWA + sinks for good: alpha = 0 in every layer and, with
    ``skip``, the memory modules replaced by a stand-in that returns zeros (exactly what
    ``alpha * Mem(x)`` is when alpha = 0, without computing Mem)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.alpha.zero_()
            if skip:
                layer.self_attn.memory = _SkippedMemory()
