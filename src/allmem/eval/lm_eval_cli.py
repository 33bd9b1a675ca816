"""lm-eval's own command line with the ``allmem`` model registered.

lm-eval 0.4.13 resolves ``--model NAME`` against its built-in registry only: it reads no entry
points and has no option to import a plugin module, so ``lm_eval --model allmem`` cannot find
a model defined outside its source tree. This runs lm-eval's CLI unchanged (same arguments,
same output) after adding the name::

    python -m allmem.eval.lm_eval_cli --model allmem \\
        --model_args pretrained=smollm2-allmem,system=allmem,window=256,sinks=4 --tasks arc_easy --limit 100

The name is registered lazily (as lm-eval registers its own models): the adapter and the
model are imported only when an evaluation asks for ``allmem``, not for ``--help`` or ``ls tasks``.
"""

from __future__ import annotations

import sys

MODEL_NAME = "allmem"
MODEL_TARGET = "allmem.eval.lm_eval_adapter:AllMemLM"  # what @register_model upgrades in place on import


def register() -> None:
    """Add ``allmem`` to lm-eval's model registry (idempotent)."""
    try:
        # lm-eval's own models first: get_model() fills an *empty* registry with them, so a
        # registry holding only "allmem" would lose "hf", "vllm", ...
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError as err:
        raise SystemExit(
            f"python -m allmem.eval.lm_eval_cli needs lm-evaluation-harness: pip install lm_eval==0.4.13 ({err})"
        ) from None
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default: this process's arguments) with ``allmem`` known."""
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:  # lm-eval's parser reads sys.argv itself
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
