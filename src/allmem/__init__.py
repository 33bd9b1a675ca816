"""AllMem: sliding-window attention with sinks plus a test-time-trained nonlinear memory,
converted from any pretrained decoder-only LLM."""

from .cache import AllMemCache
from .config import AllMemConfig, ConfigError
from .constants import DEFAULT_BASE
from .convert import SUPPORTED_FAMILIES, UnsupportedModelError, calibrate_centre, convert, from_pretrained
from .modeling import AdapterMismatchError, AllMemForCausalLM, AllMemPretrainedConfig, set_compiled


def load_base(name_or_path: str = DEFAULT_BASE, **kwargs):
    """Load a pretrained base model and its tokenizer (embedded name, local path or hub id)."""
    from .loading import load_base as _load_base

    return _load_base(name_or_path, **kwargs)


__all__ = [
    "AdapterMismatchError",
    "AllMemCache",
    "AllMemConfig",
    "AllMemForCausalLM",
    "AllMemPretrainedConfig",
    "ConfigError",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "calibrate_centre",
    "convert",
    "from_pretrained",
    "load_base",
    "set_compiled",
]
__version__ = "0.1.0"
