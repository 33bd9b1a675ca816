"""vLLM plugin: registers the ``AllMemForCausalLM`` architecture.

Declared in pyproject.toml (see docs/serving/design.md) as

    [project.entry-points."vllm.general_plugins"]
    allmem = "allmem.serving.vllm_plugin:register"

vLLM calls ``register()`` in every process it starts (API server, engine core, workers),
possibly more than once: it must be idempotent and cheap (the model class is named by
string and imported lazily by vLLM).
"""

from __future__ import annotations

import logging

ARCHITECTURE = "AllMemForCausalLM"
MODEL_CLASS = "allmem.serving.vllm_model:AllMemForCausalLM"

logger = logging.getLogger(__name__)


def _config_hook():
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``). An attention-free model
    whose layers hold per-request state needs ``cache_config.mamba_block_size`` (one state
    block per request: max_model_len) as Mamba2ForCausalLM gets from ``MambaModelConfig``.
    A recurrent state cannot be shared between requests by prefix caching (vLLM's 'align'
    mode would need state snapshots at block boundaries, which AllMem does not provide yet),
    so prefix caching is turned off here rather than left to fail later."""
    from vllm.model_executor.models.config import MambaModelConfig

    class AllMemModelConfig(MambaModelConfig):
        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            cache_config = vllm_config.cache_config
            if cache_config.enable_prefix_caching:
                logger.warning("AllMem keeps a recurrent state per request: prefix caching is turned off")
                cache_config.enable_prefix_caching = False
            super().verify_and_update_config(vllm_config)

    return AllMemModelConfig


def register() -> None:
    # config.json of an `allmem export` has model_type "allmem": importing allmem.modeling
    # registers its config class with transformers' AutoConfig (vLLM parses configs with it)
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .. import modeling  # noqa: F401

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if ARCHITECTURE not in MODELS_CONFIG_MAP:
        MODELS_CONFIG_MAP[ARCHITECTURE] = _config_hook()
