"""lm-evaluation-harness adapter: an evaluation system as lm-eval's Hugging Face model.

Short benchmarks (ARC, HellaSwag, WinoGrande, MMLU, ...) check that conversion leaves the base
model's skills intact. ``AllMemLM`` is lm-eval's own ``HFLM`` given an already-built model, so
tokenisation, batching, ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``
(stop sequences, sampling settings) are exactly lm-eval's. What differs for AllMem:

- the model comes from a system: ``pretrained`` (an embedded name such as ``smollm2-allmem``,
  a local directory, a hub id or an adapter directory) and ``system`` (``full``, ``swa``,
  ``allmem`` or ``mamba2``); every other unknown model argument is a system option
  (``window``, ``sinks``, ``chunk``, ``segment``, ``dtype``, ...; see ``allmem.eval.systems``);
- ``max_length``: the full-attention system is truncated to its trained context as ``HFLM``
  does; converted systems have no position limit and a constant-size state, so by default
  nothing is truncated (a document is scored in one window, a long prompt is read whole);
- converted systems generate with their own constant-size cache, the prompt prefilled
  ``segment`` tokens at a time, so a 100k-token prompt costs one segment's workspace;
- ``get_model_info`` reports the system without asking the hub about a local name.

From Python::

    import lm_eval
    from allmem.eval.lm_eval_adapter import AllMemLM

    lm = AllMemLM("smollm2-allmem", system="allmem")       # or AllMemLM(load_system(spec))
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)

From the command line (lm-eval 0.4.13 has no plugin discovery, so this module's
``allmem.eval.lm_eval_cli`` registers the name ``allmem`` and runs lm-eval's own CLI)::

    python -m allmem.eval.lm_eval_cli --model allmem \\
        --model_args pretrained=smollm2-allmem,system=allmem,window=256,sinks=4 --tasks arc_easy

Needs ``lm_eval`` (``pip install lm_eval==0.4.13``); importing this module without it raises an
ImportError that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - exercised only without lm_eval
    raise ImportError(
        "allmem.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm_eval==0.4.13"
    ) from err

from .systems import ConvertedSystem, System, load_system

# The max_length of a converted system left unbounded: larger than any input, and still an int
# for HFLM's arithmetic (left truncation, rolling windows, room for generated tokens).
UNBOUNDED = 2**62

# HFLM settings that apply to an already-built model; every other model argument is a system option.
_HFLM_SETTINGS = frozenset({
    "truncation", "logits_cache", "softmax_dtype", "mixed_precision_dtype", "max_batch_size", "add_bos_token",
    "prefix_token_id", "think_end_token", "enable_thinking", "chat_template_args", "trust_remote_code",
})


def _system_spec(pretrained: str, kind: str, options: dict[str, Any]) -> str:
    """``KIND:TARGET?key=value&...`` from lm-eval model arguments (which lm-eval has already
    turned into ints, floats and bools; booleans go back as 1/0, what the spec parser reads)."""
    text = {key: ("1" if value else "0") if isinstance(value, bool) else str(value) for key, value in options.items()}
    query = "&".join(f"{key}={value}" for key, value in text.items())
    return f"{kind}:{pretrained}" + (f"?{query}" if query else "")


@register_model("allmem")
class AllMemLM(HFLM):
    """lm-eval's ``HFLM`` over an ``allmem.eval.systems.System`` (see the module docstring).

    ``pretrained`` is a built System or a model name/path loaded as ``system``; keyword
    arguments named like HFLM settings go to HFLM, the rest are system options.
    ``max_length=None`` means the trained context for ``full`` and no limit for converted
    systems. ``progress=False`` hides the request progress bars.
    """

    def __init__(
        self,
        pretrained: str | System,
        system: str = "allmem",
        *,
        max_length: int | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        settings = {key: kwargs.pop(key) for key in list(kwargs) if key in _HFLM_SETTINGS}
        if isinstance(pretrained, System):
            if kwargs or device is not None:
                raise ValueError(
                    f"AllMemLM got the built system {pretrained.name!r} and system options "
                    f"{sorted(kwargs) + (['device'] if device is not None else [])}: set options when building the "
                    "system (load_system(spec, device=...)), or pass its name as pretrained"
                )
            self.system = pretrained
        elif isinstance(pretrained, str):
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.system = load_system(_system_spec(pretrained, system, kwargs), device=device)
        else:
            raise TypeError(
                f"AllMemLM(pretrained=...) takes a model name, path or System, got {type(pretrained).__name__}; "
                "for a model object use lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)"
            )
        self.streams = isinstance(self.system, ConvertedSystem)
        """Converted system: constant-size state, no length limit, generation through its cache."""
        if self.streams and max_length is None and str(batch_size).startswith("auto"):
            raise ValueError(
                "batch_size=auto tries batches of max_length tokens, and a converted system has no max_length: "
                "pass max_length=N (e.g. 4096) with batch_size=auto, or a fixed batch_size"
            )
        self.progress = progress
        super().__init__(pretrained=self.system.model, tokenizer=self.system.tokenizer, backend="causal",
                         max_length=max_length, batch_size=batch_size, **settings)

    @property
    def max_length(self) -> int:
        """Longest input scored or read in one piece (longer inputs lose tokens on the left)."""
        if self._max_length:
            return self._max_length
        return UNBOUNDED if self.streams else super().max_length

    def get_model_info(self) -> dict[str, Any]:
        # HFLM's version asks the hub for the revision of `pretrained`: here a model object
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                "allmem_system": self.system.name}

    # ----------------------------------------------------------- generation
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """HFLM's generate, after prefilling all but the last prompt column through a fresh
        constant-size cache ``segment`` tokens at a time (left padding masked)."""
        if not self.streams:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        cache = self.model.new_cache()
        segment = self.system.segment
        with torch.no_grad():
            for start in range(0, context.shape[1] - 1, segment):
                end = min(start + segment, context.shape[1] - 1)
                self.model(context[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                           cache=cache, logits_to_keep=1)
        return super()._model_generate(context, max_length, stop, cache=cache, **generation_kwargs)

    # ------------------------------------------------- progress bars only
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        # loglikelihood_rolling calls this with disable_tqdm=False whatever it was given
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not self.progress,
                                             override_bs=override_bs)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.progress)


def simple_evaluate(system: System | str, tasks: Sequence[str], *, include_path: str | Sequence[str] | None = None,
                    include_defaults: bool = True, limit: int | float | None = None, num_fewshot: int | None = None,
                    apply_chat_template: bool = False, progress: bool = True, batch_size: int = 1,
                    **kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a system (a System or a spec such as
    ``allmem:smollm2-allmem?window=256``), with lm-eval's tasks (``include_defaults``; indexing
    them takes about 10 s) and those under ``include_path``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = list(include_path) if isinstance(include_path, (list, tuple)) else include_path
    manager = TaskManager(include_path=paths, include_defaults=include_defaults or not paths)
    lm = AllMemLM(load_system(system) if isinstance(system, str) else system, batch_size=batch_size,
                  progress=progress)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, **kwargs,
    )
