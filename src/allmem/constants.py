"""Constants that more than one module needs, defined once: the default base model, the dtypes
a user may name, and the package's own directory.

Nothing here imports torch at module level, so that the CLI can import a constant and still
answer ``--help`` without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_BASE", "DTYPE_NAMES", "PACKAGE_DIR", "torch_dtype"]

#: The base model used when none is named: the embedded SmolLM2-135M-Instruct (see allmem.loading).
DEFAULT_BASE = "smollm2"

#: The installed ``allmem`` package; what the wheel ships (adapters, recipes, model configs) is under it.
PACKAGE_DIR = Path(__file__).resolve().parent

#: The dtypes a user may name (``--dtype``, system specs, recipes); the first is the default.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``, one of :data:`DTYPE_NAMES`.

    Raises ``ValueError`` naming the choices otherwise; callers re-raise it as their own error
    type (argparse's, a spec error) where they need to.
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)
