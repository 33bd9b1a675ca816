"""lm-evaluation-harness adapter: any evaluation system as an ``lm_eval`` model.

Short benchmarks (ARC, HellaSwag, WinoGrande, MMLU, ...) check that conversion leaves the base
model's skills intact. Use it from Python::

    import lm_eval
    from allmem.eval.lm_eval_adapter import AllMemLM

    lm = AllMemLM("allmem:runs/distill/adapter")            # or a System object
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)

or from lm-eval's own command line once this module is imported (it registers the model name
``allmem``): ``--model allmem --model_args spec=swa:smollm2?window=256``.

Requests are scored one at a time (no batching: the converted systems stream a single
sequence through a constant-size state). Tokenisation follows lm-eval's ``HFLM``: trailing
spaces of a context move to the continuation; the pair is encoded as a whole and split where
the context's own encoding ends; an empty context is replaced by the prefix token (BOS, else
EOS). The full-attention system truncates inputs on the left to its trained context like
``HFLM``; converted systems have no length limit, so ``loglikelihood_rolling`` scores a whole
document in one streaming pass. ``generate_until`` always decodes greedily.

Needs ``lm_eval`` (``pip install lm_eval==0.4.13``); importing this module without it raises an
ImportError that says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without lm_eval
    raise ImportError(
        "allmem.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm_eval==0.4.13"
    ) from err

from .systems import System, load_system

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


def _register(cls):
    try:
        return register_model("allmem")(cls)
    except (AssertionError, ValueError, KeyError):  # already registered (module reloaded)
        return cls


@_register
class AllMemLM(LM):
    """An ``lm_eval.api.model.LM`` over an ``allmem.eval.systems.System`` (or a spec string)."""

    def __init__(
        self,
        system: System | str | None = None,
        *,
        spec: str | None = None,
        max_length: int | None = None,
        prefix_token_id: int | None = None,
        progress: bool = True,
        batch_size: Any = None,  # accepted for lm-eval's CLI; requests run one at a time
        device: Any = None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        if system is None and spec is None:
            raise ValueError("AllMemLM needs a system: AllMemLM(system) or model_args spec=KIND:MODEL")
        source = system if system is not None else spec
        self.system: System = load_system(source) if isinstance(source, str) else source
        self.tokenizer = self.system.tokenizer
        self._max_length = max_length if max_length is not None else self.system.max_length
        self._prefix_token_id = prefix_token_id
        self.progress = progress

    # ------------------------------------------------------------- properties
    @property
    def max_length(self) -> int | None:
        """Longest input scored in one piece; None = unbounded (converted systems)."""
        return self._max_length

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by (lm-eval: BOS, else EOS)."""
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ------------------------------------------------------------- encoding
    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the way lm-eval's HFLM splits them."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids) :]

    # -------------------------------------------------------------- scoring
    def score_tokens(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
        """Log-probability of the continuation given the context, and whether greedy decoding
        would produce it; the input is left-truncated to ``max_length + 1`` tokens if set."""
        if not continuation_ids:
            return 0.0, True
        ids = list(context_ids) + list(continuation_ids)
        if self.max_length is not None:
            ids = ids[-(self.max_length + 1) :]
        scores = self.system.token_scores(ids)
        n = len(continuation_ids)
        return -float(scores.nll[-n:].sum()), bool(scores.greedy[-n:].all())

    def _bar(self, items: Sequence[Any], desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.progress, dynamic_ncols=True)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in self._bar(requests, f"loglikelihood {self.system.name}"):
            context, continuation = request.args
            result = self.score_tokens(*self.encode_pair(context, continuation))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in self._bar(requests, f"loglikelihood_rolling {self.system.name}"):
            (text,) = request.args
            tokens = self.tok_encode(text)
            if self.max_length is None:
                windows = [([self.prefix_token_id], tokens)] if tokens else []
            else:
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
                ]
            total = sum(self.score_tokens(ctx, cont)[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in self._bar(requests, f"generate_until {self.system.name}"):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                logger.warning("AllMemLM decodes greedily; ignoring sampling settings %s", kwargs)
            ids = self.tok_encode(context)
            if self.max_length is not None:
                ids = ids[-max(1, self.max_length - max_gen) :]
            text = self.system.generate_ids(ids, max_gen, stop=until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def simple_evaluate(system: System | str, tasks: Sequence[str], *, include_path: str | Sequence[str] | None = None,
                    include_defaults: bool = True, limit: int | float | None = None, num_fewshot: int | None = None,
                    apply_chat_template: bool = False, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a system, with lm-eval's tasks (``include_defaults``;
    indexing them takes about 10 s) and those under ``include_path``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    paths = list(include_path) if isinstance(include_path, (list, tuple)) else include_path
    manager = TaskManager(include_path=paths, include_defaults=include_defaults or not paths)
    lm = AllMemLM(system, progress=progress)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, **kwargs,
    )
