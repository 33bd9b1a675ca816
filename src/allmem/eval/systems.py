"""Systems under evaluation: anything that can score text and generate from a prompt.

A *system spec* names a model and how it attends::

    full:smollm2                               the base model, full attention (transformers SDPA,
                                               standard KV cache)
    swa:smollm2?window=256&sinks=4             converted, memory off: sliding window + sinks
    allmem:smollm2?window=256&sinks=4&chunk=128    converted, memory on (untrained memory is fine)
    allmem:runs/distill/adapter                a saved adapter (its base is loaded as it names)
    mamba2:smollm2?window=256&sinks=4          the Mamba-2 baseline (memory_type="mamba2"), where
                                               this version of AllMemConfig has that field

The part after ``KIND:`` is an embedded model name, a local Hugging Face directory, a hub id
or (``swa``/``allmem``/``mamba2``) an adapter directory. Options after ``?`` (``&``-separated):

- every system: ``segment`` (tokens per forward when scoring or prefilling; memory use scales
  with it), ``dtype`` (float32 | bfloat16 | float16), ``name`` (the label in tables);
- converted systems: any scalar ``AllMemConfig`` field (``window``, ``sinks``, ``chunk``,
  ``positions``, ``base_lr``, ``init``, ...); on a saved adapter only the runtime fields
  ``window``, ``sinks``, ``chunk``, ``positions`` and ``swa_block`` may change;
- ``swa``: ``skip_memory`` (default 1). With alpha = 0 the memory's output is multiplied by
  zero, so the memory need not run at all: the output is bit-for-bit that of the converted
  model under ``memory_disabled()`` (a test checks it) at about half the cost on CPU.
  ``skip_memory=0`` runs it anyway.

Every system offers ``generate(prompt_text, max_new_tokens, chat)`` (greedy) and
``token_nlls(input_ids)``. Converted systems read long inputs segment by segment through their
constant-size cache (``streaming.ingest``); the full system prefills and scores in segments
with its KV cache, which grows with the input as full attention must.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import torch

KINDS = ("full", "swa", "allmem", "mamba2")
_RUNTIME_FIELDS = ("window", "sinks", "chunk", "positions", "swa_block")
_COMMON_OPTIONS = ("segment", "dtype", "name", "skip_memory")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SystemSpecError(ValueError):
    """A system spec that cannot be parsed or does not fit its kind."""


@dataclass(frozen=True)
class SystemSpec:
    kind: str
    target: str
    options: dict[str, str]
    text: str

    @property
    def name(self) -> str:
        return self.options.get("name", self.text)


def parse_spec(spec: str) -> SystemSpec:
    """``KIND:TARGET[?key=value&...]`` -> SystemSpec (values stay strings until loading)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise SystemSpecError(
            f"bad system spec {spec!r}: expected KIND:MODEL[?key=value&...] with KIND one of {', '.join(KINDS)} "
            "(e.g. full:smollm2, swa:smollm2?window=256&sinks=4, allmem:PATH_TO_ADAPTER)"
        )
    target, _, query = rest.partition("?")
    if not target:
        raise SystemSpecError(f"bad system spec {spec!r}: no model after {kind}:")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise SystemSpecError(f"bad options {query!r} in system spec {spec!r}: write key=value&key=value") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise SystemSpecError(f"option {key!r} given twice in system spec {spec!r}")
        options[key] = value
    return SystemSpec(kind, target, options, spec)


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


def _int_option(spec: SystemSpec, key: str, default: int) -> int:
    value = spec.options.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SystemSpecError(f"option {key}={value!r} in {spec.text!r} should be an integer") from None
    if number <= 0:
        raise SystemSpecError(f"option {key}={value!r} in {spec.text!r} should be positive")
    return number


# ------------------------------------------------------------------------------- systems


@dataclass
class TokenScores:
    """Per predicted token (positions 1..L-1 of the input): negative log-likelihood and
    whether the token is the model's greedy (argmax) choice."""

    nll: torch.Tensor  # [L-1] float64
    greedy: torch.Tensor  # [L-1] bool


class System:
    """A model under evaluation. Subclasses implement ``_segment_logits`` and ``generate_ids``."""

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
        eos = set()
        for source in (getattr(model, "generation_config", None), tokenizer):
            value = getattr(source, "eos_token_id", None)
            eos.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
        self.eos_token_ids = sorted(int(t) for t in eos)

    # max_length: the longest input the system scores in one piece (lm-eval truncates to it);
    # None = unbounded (the converted systems' state does not grow).
    max_length: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        """Scores of tokens 1..L-1, computed ``segment`` tokens at a time; ``on_segment(n)`` is
        called after each segment of n tokens (progress bars)."""
        ids = self._as_ids(input_ids)
        if ids.shape[1] < 2:
            empty = torch.zeros(0, dtype=torch.float64)
            return TokenScores(empty, torch.zeros(0, dtype=torch.bool))
        nlls, greedy = [], []
        for start, logits in self._segment_logits(ids):
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

    def _segment_logits(self, ids: torch.Tensor):
        """Yield (start, logits [T, V]) for consecutive segments of ``ids`` [1, L]."""
        raise NotImplementedError

    # ------------------------------------------------------------ generation
    def generate(self, prompt_text: str, max_new_tokens: int, chat: bool = False, *,
                 stop: Sequence[str] | None = None) -> str:
        """Greedy continuation of ``prompt_text`` (wrapped in the chat template when ``chat``),
        without the prompt and special tokens; cut before the first of ``stop`` if given."""
        return self.generate_ids(self.encode(prompt_text, chat=chat), max_new_tokens, stop=stop)

    def generate_ids(self, input_ids: Sequence[int], max_new_tokens: int, *,
                     stop: Sequence[str] | None = None) -> str:
        raise NotImplementedError

    def _finish(self, new_ids: list[int], stop: Sequence[str] | None) -> str:
        new_ids = [t for t in new_ids if t not in self.eos_token_ids]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return cut_at_stop(text, stop)

    def close(self) -> None:
        """Drop the model (the CLI evaluates systems one after the other)."""
        self.model = None


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop or ():
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _StopOnStrings:
    """A transformers stopping criterion: stop once the new text contains a stop string."""

    def __init__(self, tokenizer: Any, prompt_length: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, [s for s in stop if s]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        done = any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


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

    def _forward(self, ids: torch.Tensor, cache: Any, **kwargs: Any):
        # transformers renamed past_key_values to cache during 5.x; pass whichever this one takes
        import inspect

        if not hasattr(self, "_cache_kw"):
            params = inspect.signature(self.model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return self.model(ids, use_cache=True, **{self._cache_kw: cache}, **kwargs)

    def _segment_logits(self, ids: torch.Tensor):
        cache = self._new_cache()
        for start in range(0, ids.shape[1], self.segment):
            yield start, self._forward(ids[:, start : start + self.segment], cache).logits[0]

    @torch.no_grad()
    def generate_ids(self, input_ids: Sequence[int], max_new_tokens: int, *,
                     stop: Sequence[str] | None = None) -> str:
        ids = self._as_ids(input_ids)
        if ids.shape[1] == 0:
            raise ValueError(f"{self.name}: cannot generate from an empty prompt")
        cache = self._new_cache()
        for start in range(0, ids.shape[1] - 1, self.segment):  # prefill all but the last token
            end = min(start + self.segment, ids.shape[1] - 1)
            self._forward(ids[:, start:end], cache, logits_to_keep=1)
        logits = self._forward(ids[:, -1:], cache).logits[:, -1]
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax(-1)[0])
            if token in self.eos_token_ids:
                break
            new.append(token)
            if stop and any(s and s in self.tokenizer.decode(new, skip_special_tokens=True) for s in stop):
                break
            step = torch.tensor([[token]], device=ids.device)
            logits = self._forward(step, cache).logits[:, -1]
        return self._finish(new, stop)


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

    def _segment_logits(self, ids: torch.Tensor):
        cache = self.model.new_cache()
        for start in range(0, ids.shape[1], self.segment):
            out = self.model(ids[:, start : start + self.segment], cache=cache)
            yield start, out.logits[0]

    @torch.no_grad()
    def generate_ids(self, input_ids: Sequence[int], max_new_tokens: int, *,
                     stop: Sequence[str] | None = None) -> str:
        from transformers import StoppingCriteriaList

        from ..streaming import ingest

        ids = self._as_ids(input_ids)
        length = ids.shape[1]
        if length == 0:
            raise ValueError(f"{self.name}: cannot generate from an empty prompt")
        if max_new_tokens <= 0:
            return ""
        cache = self.model.new_cache()
        if length > 1:
            ingest(self.model, ids[:, :-1], cache, segment=self.segment, progress=False)
        criteria = StoppingCriteriaList([_StopOnStrings(self.tokenizer, length, stop)]) if stop else None
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_k=None, top_p=None, stopping_criteria=criteria,
            eos_token_id=self.eos_token_ids or None, pad_token_id=(self.eos_token_ids or [0])[0],
        )
        return self._finish(out[0, length:].tolist(), stop)


# ------------------------------------------------------------------------------- loading


def _allmem_config_fields() -> dict[str, dataclasses.Field]:
    from ..config import AllMemConfig

    return {f.name: f for f in dataclasses.fields(AllMemConfig) if f.name != "extra"}


def supports_mamba2() -> bool:
    """True when this version of AllMemConfig has ``memory_type`` (the Mamba-2 baseline)."""
    return "memory_type" in _allmem_config_fields()


def _check_options(spec: SystemSpec, allowed: set[str]) -> None:
    unknown = sorted(set(spec.options) - allowed)
    if unknown:
        raise SystemSpecError(
            f"unknown option(s) {unknown} for a {spec.kind} system in {spec.text!r}; allowed: {sorted(allowed)}"
        )


def _is_adapter(target: str) -> bool:
    from ..modeling import adapter_dir

    return adapter_dir(target) is not None


def load_system(spec: str | SystemSpec, *, device: str | None = None) -> System:
    """Build the system a spec names (see the module docstring); loads weights."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    dtype_name = spec.options.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise SystemSpecError(f"dtype={dtype_name!r} in {spec.text!r}: choose from {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype_name]

    if spec.kind == "full":
        _check_options(spec, {"segment", "dtype", "name"})
        from ..loading import load_base

        segment = _int_option(spec, "segment", 2048)
        if _is_adapter(spec.target):
            raise SystemSpecError(f"{spec.text!r}: full: takes a base model, not an adapter directory")
        base, tokenizer = load_base(spec.target, dtype=dtype, device=device)
        return FullAttentionSystem(spec.name, base.eval(), tokenizer, segment=segment)

    if spec.kind == "mamba2" and not supports_mamba2():
        raise NotImplementedError(
            f"{spec.text!r}: the Mamba-2 baseline needs AllMemConfig.memory_type, which this version of "
            "allmem does not have yet"
        )
    fields = _allmem_config_fields()
    allowed = set(fields) | set(_COMMON_OPTIONS)
    if spec.kind != "swa":
        allowed.discard("skip_memory")
    _check_options(spec, allowed)
    if spec.kind == "mamba2" and spec.options.get("memory_type", "mamba2") != "mamba2":
        raise SystemSpecError(f"{spec.text!r}: a mamba2 system has memory_type=mamba2")
    if spec.kind != "mamba2" and spec.options.get("memory_type", "ttt") != "ttt":
        raise SystemSpecError(f"{spec.text!r}: use the mamba2: kind for memory_type=mamba2")
    segment = _int_option(spec, "segment", 1024)
    config_options = {k: _coerce(fields[k], v, spec.text) for k, v in spec.options.items() if k in fields}
    if spec.kind == "mamba2":
        config_options["memory_type"] = "mamba2"

    from .. import convert, from_pretrained
    from ..config import AllMemConfig
    from ..loading import load_base

    if _is_adapter(spec.target):
        fixed = sorted(set(config_options) - set(_RUNTIME_FIELDS) - {"memory_type"})
        if fixed:
            raise SystemSpecError(
                f"{spec.text!r}: a saved adapter fixes {fixed}; only {list(_RUNTIME_FIELDS)} can change at run time"
            )
        model = from_pretrained(spec.target, dtype=dtype, device=device)
        saved_type = getattr(model.allmem_config, "memory_type", "ttt")
        wanted_type = "mamba2" if spec.kind == "mamba2" else saved_type if spec.kind == "swa" else "ttt"
        if saved_type != wanted_type:
            raise SystemSpecError(f"{spec.text!r}: the adapter's memory_type is {saved_type!r}; use {saved_type}: for it")
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
        skip = spec.options.get("skip_memory", "1")
        try:
            skip_memory = _bool(skip)
        except ValueError:
            raise SystemSpecError(f"skip_memory={skip!r} in {spec.text!r} should be 0 or 1") from None
        disable_memory(model, skip=skip_memory)
    return ConvertedSystem(spec.name, model, tokenizer, segment=segment, kind=spec.kind)


def disable_memory(model: Any, *, skip: bool = True) -> None:
    """Turn a converted model into SWA + sinks for good: alpha = 0 in every layer and, with
    ``skip``, the memory modules replaced by a stand-in that returns zeros (exactly what
    ``alpha * Mem(x)`` is when alpha = 0, without computing Mem)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.alpha.zero_()
            if skip:
                layer.self_attn.memory = _SkippedMemory()
