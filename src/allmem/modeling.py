"""AllMemForCausalLM: a converted decoder with Hugging Face-style forward, generate and
save/load of the trainable adapter.

The base model's embeddings, decoder layers (MLP, norms), final norm and LM head are
reused as they are; each layer's ``self_attn`` is an ``AllMemAttention``. The forward runs
its own loop over the layers so that no L x L mask is ever built, and keeps every row
*aligned* (real tokens first) while inside the layers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import AllMemCache, first_non_finite
from .compat import CACHE_NAME, cache_argument, causal_lm_output
from .config import AllMemConfig, ConfigError
from .files import atomic_temp_dir, file_sha256, normal_permissions
from .layer import AllMemAttention, Segment, decode_mixer, has_forward_hooks
from .layer import set_compiled as set_layer_compiled  # modeling.set_compiled covers it
from .memory import AllMemMemory

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "allmem_config.json"
# adapters that ship inside the package (each folder of adapters/ with an adapter config), usable by
# name wherever an adapter directory is: smollm2-allmem (the default) and smollm2-allmem-recall
SHIPPED_ADAPTERS = {folder.name: folder for folder in sorted((Path(__file__).parent / "adapters").iterdir())
                    if (folder / ADAPTER_CONFIG).is_file()}
ADAPTER_FORMAT = "allmem-adapter/1"
ADAPTER_SUMS = "SHA256SUMS"  # `sha256sum` lines beside a shipped adapter's weights
CHECKPOINT_CONFIG = "config.json"  # a self-contained checkpoint (export_pretrained): model_type "allmem"
CHECKPOINT_WEIGHTS = "model.safetensors"
MODEL_TYPE = "allmem"


class AllMemPretrainedConfig(PretrainedConfig):
    """The ``config.json`` of a self-contained AllMem checkpoint (``export_pretrained``), what
    the Auto classes dispatch on (model_type "allmem"). It is the base model's own config, flat
    (engines that read ``hidden_size``, ``num_key_value_heads`` ... find them where they look),
    plus ``base_model_type`` (the base's model_type), ``allmem`` (the ``AllMemConfig``
    settings) and ``allmem_base`` (the name the base was loaded by). A loaded model keeps the
    base's config as ``model.config``."""

    model_type = MODEL_TYPE
    base_model_type: str | None = None
    allmem: dict | None = None
    allmem_base: str | None = None

    _OWN = ("model_type", "base_model_type", "allmem", "allmem_base", "architectures", "transformers_version")

    @classmethod
    def of(cls, model: "AllMemForCausalLM") -> "AllMemPretrainedConfig":
        fields = {k: v for k, v in model.config.to_dict().items() if k not in cls._OWN}
        return cls(**fields, base_model_type=model.config.model_type, allmem=model.allmem_config.to_dict(),
                   allmem_base=model.base_name, architectures=[type(model).__name__])

    def base_model_config(self) -> PretrainedConfig:
        fields = {k: v for k, v in self.to_dict().items() if k not in self._OWN}
        return AutoConfig.for_model(self.base_model_type, **fields)


class AdapterMismatchError(ValueError):
    """An adapter was applied to a base model other than the one it was trained on."""


class AdapterFileError(ValueError):
    """An adapter's weights are damaged: a SHA-256 mismatch with its SHA256SUMS, or NaN/Inf."""


def verify_sha256sums(directory: Path, required: bool) -> None:
    """Check every file that ``directory/SHA256SUMS`` lists. ``required`` (a shipped adapter,
    loaded by name) makes a missing SHA256SUMS an error rather than nothing to check."""
    sums = directory / ADAPTER_SUMS
    if not sums.is_file():
        if required:
            raise AdapterFileError(f"{sums} is missing: the shipped adapter cannot be verified; reinstall the package")
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        target = directory / name.lstrip("*")  # `sha256sum -b` marks binary files with *
        if not target.is_file():
            raise FileNotFoundError(f"{target} is missing: {sums} lists it")
        if file_sha256(target) != digest.lower():
            raise AdapterFileError(f"{target} does not match its SHA-256 in {sums}: the file is damaged or was "
                                   "replaced; reinstall the package or restore the file")


def base_signature(model: torch.nn.Module, config: PretrainedConfig) -> dict[str, Any]:
    """Shape facts plus a weight checksum that identify a base model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    first_attention = model.model.layers[0].self_attn
    attn = getattr(first_attention, "attn", first_attention)
    return {
        "model_type": text.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": text.vocab_size,
        "checksum": float(attn.q_proj.weight.detach().double().abs().sum()),
    }


def check_signature(expected: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    for key, want in expected.items():
        got = actual.get(key)
        if key == "checksum":
            if got is None or not math.isclose(want, got, rel_tol=1e-3):
                raise AdapterMismatchError(
                    f"the adapter at {where} was trained on different base weights (checksum {want:.6g}, "
                    f"this base {got:.6g}); load the base it names in {ADAPTER_CONFIG}"
                )
        elif want != got:
            raise AdapterMismatchError(
                f"the adapter at {where} was trained on a base with {key}={want!r}, but this base has {key}={got!r}; "
                f"load the base it names in {ADAPTER_CONFIG}"
            )


class AllMemForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AllMemPretrainedConfig  # what the Auto classes map to this class; model.config is the base's
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _is_stateful = True
    # beam search reorders the cache's rows (AllMemCache.reorder_cache); assisted decoding
    # is refused by transformers for stateful models (a recurrent state cannot roll back)
    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE,
                                   GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE]

    def __init__(self, base: PreTrainedModel, allmem_config: AllMemConfig, base_name: str | None = None):
        super().__init__(base.config)
        for item in (*base.modules(), *base.parameters()):
            item._is_hf_initialized = True  # post_init must never touch pretrained weights
        self.model = base.model
        self.lm_head = base.lm_head
        if getattr(base.config, "tie_word_embeddings", False):
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.generation_config = base.generation_config
        self.allmem_config = allmem_config
        self.base_name = base_name or getattr(base, "allmem_base_name", None) or base.config._name_or_path
        object.__setattr__(self, "_base", base)  # not a submodule: its parameters are ours already
        self._signature = base_signature(base, base.config)
        text = base.config.get_text_config()
        for layer in self.model.layers:
            layer.self_attn = AllMemAttention(layer.self_attn, text.hidden_size, text.num_key_value_heads, allmem_config)
            # post_init re-initialises every unflagged module under base.model with the *base
            # family's* _init_weights (smart_apply recurses into it): the memory's spec init
            # (eta at base_lr, beta at momentum_init, zero control weights) must survive it
            for item in (*layer.self_attn.modules(), *layer.self_attn.parameters()):
                item._is_hf_initialized = True
        self.post_init()

    def _init_weights(self, module):  # every new module initialises itself on construction
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must let forward create an AllMemCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # the only cache is the constant-size AllMemCache: a cache_implementation ("static",
        # "offloaded", "quantized", ...) would otherwise be ignored with a misleading warning
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} cannot apply to an AllMem model: it "
                "decodes with its own constant-size AllMemCache; leave cache_implementation unset (or pass "
                "cache=model.new_cache())"
            )
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # generate(cache=...) on every transformers version (before 5.24 it knows past_key_values only),
    # past_key_values=... too: handed on under the installed version's name
    generate = cache_argument(CACHE_NAME)(GenerationMixin.generate)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    # -------------------------------------------------------------- helpers
    def memory_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable adapter: memory modules and alpha of every layer."""
        return {n: p for n, p in self.named_parameters() if ".memory." in n or n.endswith(".alpha")}

    def set_runtime(self, **changes: Any) -> None:
        """Change window / sinks / chunk (e.g. randomised training); validated like the config."""
        self.allmem_config = self.allmem_config.replace(**changes)

    def new_cache(self) -> AllMemCache:
        c = self.allmem_config
        return AllMemCache(len(self.model.layers), c.window, c.sinks, c.chunk)

    @contextlib.contextmanager
    def memory_disabled(self):
        """Temporarily set alpha to zero everywhere: the model is then exactly SWA + sinks."""
        alphas = [layer.self_attn.alpha for layer in self.model.layers]
        saved = [a.detach().clone() for a in alphas]
        try:
            with torch.no_grad():
                for a in alphas:
                    a.zero_()
            yield self
        finally:
            with torch.no_grad():
                for a, s in zip(alphas, saved):
                    a.copy_(s)

    @contextlib.contextmanager
    def original_attention(self):
        """Temporarily restore the pretrained full attention: ``self.base(...)`` is then the
        original model (the distillation teacher, the full-attention baseline)."""
        wrappers = [layer.self_attn for layer in self.model.layers]
        try:
            for layer, wrapper in zip(self.model.layers, wrappers):
                layer.self_attn = wrapper.attn
            yield self._base
        finally:
            for layer, wrapper in zip(self.model.layers, wrappers):
                layer.self_attn = wrapper

    # -------------------------------------------------------------- forward
    @cache_argument("cache")  # past_key_values= too: the name generate() passes before transformers 5.24
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: AllMemCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        return_hidden: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Like a Hugging Face causal LM. ``attention_mask`` [B, past + T] marks padding (left or
        right); ``position_ids`` are ignored: positions come from each row's real-token count.
        ``return_hidden=True`` skips the LM head and returns the final normed hidden states as
        ``hidden_states`` (the distillation loss projects only the positions it scores).
        ``output_hidden_states=True`` returns transformers' tuple (the embeddings, each layer's
        output, the last one normed); ``output_attentions`` raises: no attention matrix exists."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.pop("output_attentions", None) or getattr(self.config, "output_attentions", False):
            raise NotImplementedError(
                "output_attentions is not available for an AllMem model: its sink + sliding-window attention runs "
                "blocked and its memory has no attention weights, so no [T, T] attention matrix is ever built"
            )
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if not isinstance(output_hidden_states, bool):
            raise ValueError(f"output_hidden_states must be True or False for an AllMem model, got {output_hidden_states!r}")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if use_cache is None:
            use_cache = cache is not None or (not self.training and self.config.use_cache)
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            self._check_cache(cache, batch)

        if attention_mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            real = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        seq_lens = real.sum(1)
        padded = not bool(real.all())
        if padded:
            order, inverse = _alignment(real, seq_lens)
            inputs_embeds = inputs_embeds.gather(1, order[..., None].expand_as(inputs_embeds))

        cfg = self.allmem_config
        seen = cache.seen if cache is not None and cache.seen is not None else torch.zeros(batch, dtype=torch.long, device=device)
        positions = seen[:, None] + torch.arange(length, device=device)[None]
        rotary = self.model.rotary_emb
        cos, sin = rotary(inputs_embeds, position_ids=positions)
        sink_cos = sink_sin = None
        if cfg.positions == "rolling" and cfg.sinks > 0:
            sink_cos, sink_sin = rotary(inputs_embeds, position_ids=positions.clamp(max=cfg.sinks + cfg.window - 1))
        segment = Segment(
            config=cfg, seq_lens=seq_lens, seen=seen, cos=cos, sin=sin, sink_cos=sink_cos, sink_sin=sink_sin,
            states=cache.layers if cache is not None else None,
            steady_decode=cache is not None and length == 1 and not padded and bool((seen >= cfg.sinks).all()),
        )
        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.model.layers:
            if segment.steady_decode and prenorm_decoder_layer(layer):
                hidden = layer.self_attn.steady_decode(_DECODE_BLOCK["fn"], layer, hidden, segment)
            else:
                hidden = layer(hidden, allmem_segment=segment)
            if all_hidden is not None:
                all_hidden.append(hidden)
        if padded:
            hidden = hidden.gather(1, inverse[..., None].expand_as(hidden))
            if all_hidden is not None:
                all_hidden = [h.gather(1, inverse[..., None].expand_as(h)) for h in all_hidden]
        if cache is not None:
            cache.seen = seen + seq_lens
            cache.columns += length

        hidden = self.model.norm(hidden)
        hidden_states = None
        if all_hidden is not None:  # as transformers' decoders: the last one is after the final norm
            hidden_states = (*all_hidden[:-1], hidden)
        if return_hidden:
            return causal_lm_output(hidden_states=hidden, cache=cache if use_cache else None)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return causal_lm_output(loss=loss, logits=logits, cache=cache if use_cache else None,
                                hidden_states=hidden_states)

    def _check_cache(self, cache: AllMemCache, batch: int) -> None:
        if not isinstance(cache, AllMemCache):
            raise TypeError(f"an AllMem model needs an AllMemCache (model.new_cache()), got {type(cache).__name__}")
        cache.check_usable()
        cfg = self.allmem_config
        if (cache.window, cache.sinks, cache.chunk) != (cfg.window, cfg.sinks, cfg.chunk):
            raise ValueError(
                f"the cache was built for window={cache.window}, sinks={cache.sinks}, chunk={cache.chunk} but the "
                f"model runs window={cfg.window}, sinks={cfg.sinks}, chunk={cfg.chunk}; start a new cache"
            )
        if cache.batch_size not in (-1, batch):
            raise ValueError(f"the cache holds {cache.batch_size} sequences but the input has {batch}")

    # ------------------------------------------------------------ save/load
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        base: PreTrainedModel | None = None, dtype: torch.dtype = torch.float32,
                        device: str | None = None, **kwargs: Any) -> "AllMemForCausalLM":
        """``allmem.from_pretrained`` under transformers' name: a shipped adapter's name (e.g.
        "smollm2-allmem"), a directory written by ``save_pretrained`` (the base its adapter names
        is loaded as ``allmem.load_base`` resolves it, or ``base`` is used) or a self-contained
        checkpoint written by ``export_pretrained`` (also what ``AutoModelForCausalLM`` hands
        over here). Other keyword arguments of ``PreTrainedModel.from_pretrained`` raise rather
        than being ignored."""
        # what AutoModelForCausalLM.from_pretrained adds when it dispatches to this class
        config = kwargs.pop("config", None)
        if config is not None and not isinstance(config, AllMemPretrainedConfig):
            raise TypeError(f"config must be an AllMemPretrainedConfig (read from the checkpoint), got {type(config).__name__}")
        if config is not None and (not is_checkpoint(pretrained_model_name_or_path) or config.allmem != (
                AllMemPretrainedConfig.from_pretrained(pretrained_model_name_or_path).allmem)):
            raise ValueError("config= can only be the checkpoint's own config (the Auto classes pass it): the model is "
                             "rebuilt from its saved settings; change window/sinks/chunk with model.set_runtime(...)")
        for key in ("_from_auto", "trust_remote_code", "local_files_only"):  # only local files are ever read
            kwargs.pop(key, None)
        # hub arguments the Auto classes pass at their defaults (transformers >= 5.25 passes all of
        # them): harmless when unset, refused when set, since nothing here is downloaded
        for key in ("adapter_kwargs", "revision", "cache_dir", "force_download", "proxies", "subfolder", "token"):
            if not kwargs.get(key):
                kwargs.pop(key, None)
        if dtype == "auto":  # transformers' "as saved": a checkpoint's base dtype, an adapter's base in float32
            dtype = None
        if model_args or kwargs:
            given = [repr(a) for a in model_args] + sorted(kwargs)
            raise TypeError(
                f"AllMemForCausalLM.from_pretrained got unsupported arguments {', '.join(given)}: it takes an adapter "
                "name or directory and base=, dtype=, device= (the base model is loaded as its adapter config names it)"
            )
        from .convert import from_pretrained

        if dtype is None and not is_checkpoint(pretrained_model_name_or_path):
            dtype = torch.float32
        return from_pretrained(pretrained_model_name_or_path, base=base, dtype=dtype, device=device)

    def export_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a self-contained checkpoint, atomically: ``config.json`` (model_type "allmem":
        the base's config fields and the AllMem settings, ``AllMemPretrainedConfig``), ``model.safetensors`` (every weight, base and
        memory; a tied LM head once), ``generation_config.json`` and the tokenizer when one is
        attached (``model.tokenizer``). It loads without the base's files, with
        ``AllMemForCausalLM.from_pretrained``, ``allmem.from_pretrained`` or, once ``allmem`` is
        imported, ``transformers.AutoModelForCausalLM.from_pretrained``. ``dtype`` casts the
        base weights; the memory keeps its own dtype (at least float32, as ``convert`` makes it)."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_temp_dir(target.parent, target.name)
        try:
            memory = set(self.memory_parameters())
            tensors = {}
            for name, t in self.state_dict().items():
                if name == "lm_head.weight" and t.data_ptr() == self.lm_head.weight.data_ptr() \
                        and t.data_ptr() == self.model.embed_tokens.weight.data_ptr():
                    continue  # tied to the embeddings: stored once, tied again on load
                cast = dtype if dtype is not None and name not in memory and t.is_floating_point() else t.dtype
                tensors[name] = t.detach().to(cast).contiguous().cpu()
            save_file(tensors, tmp / CHECKPOINT_WEIGHTS, metadata={"format": "pt"})
            AllMemPretrainedConfig.of(self).save_pretrained(tmp)
            self.generation_config.save_pretrained(tmp)
            if getattr(self, "tokenizer", None) is not None:
                self.tokenizer.save_pretrained(tmp)
            target.mkdir(exist_ok=True)
            normal_permissions(tmp)
            for item in sorted(tmp.iterdir()):
                os.replace(item, target / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None, *,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write the adapter (memory parameters + config naming the base), atomically;
        ``dtype`` (e.g. torch.bfloat16 to ship it at half size) casts the saved weights;
        ``is_main_process=False`` (other ranks of a distributed run) writes nothing. Other
        options of ``PreTrainedModel.save_pretrained`` (``push_to_hub``, ``state_dict``,
        ``max_shard_size``, ...) raise ``TypeError``: they would otherwise be silently ignored."""
        if kwargs:
            raise TypeError(
                f"AllMemForCausalLM.save_pretrained does not support {', '.join(sorted(kwargs))}: it writes the adapter "
                "(memory weights + allmem_config.json) to a local directory, with only dtype= and is_main_process=; "
                "to publish it, upload that directory (e.g. huggingface_hub.upload_folder)"
            )
        if not is_main_process:
            return
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_temp_dir(target.parent, target.name)
        try:
            tensors = {n: p.detach().to(dtype or p.dtype).contiguous().cpu() for n, p in self.memory_parameters().items()}
            save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": ADAPTER_FORMAT})
            meta = {
                "format": ADAPTER_FORMAT,
                "base": self.base_name,
                "base_signature": self._signature,
                "allmem": self.allmem_config.to_dict(),
                "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
            }
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
            target.mkdir(exist_ok=True)
            normal_permissions(tmp)
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                os.replace(tmp / name, target / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_memory_adapter(self, directory: str | os.PathLike) -> None:
        """Load AllMem adapter weights (memory parameters and alpha) from a directory or a
        shipped adapter's name; not PEFT's ``load_adapter``. Files listed in a
        SHA256SUMS beside them are verified (a shipped adapter must have one), and weights
        holding NaN/Inf are refused (``AdapterFileError``) before any parameter is touched."""
        shipped = str(directory) in SHIPPED_ADAPTERS
        directory = adapter_dir(directory) or Path(directory)
        meta = read_adapter_config(directory)
        check_signature(meta["base_signature"], self._signature, str(directory))
        weights_path = directory / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path} is missing: the adapter directory is incomplete")
        verify_sha256sums(directory, required=shipped)
        tensors = load_file(str(weights_path))
        bad = first_non_finite(tensors)
        if bad is not None:
            raise AdapterFileError(f"{weights_path} holds NaN or Inf values (in {bad}): the adapter is damaged; "
                                   "restore it or train it again")
        params = self.memory_parameters()
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise AdapterMismatchError(
                f"{weights_path} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        with torch.no_grad():
            for name, p in params.items():
                if p.shape != tensors[name].shape:
                    raise AdapterMismatchError(f"{name}: adapter shape {tuple(tensors[name].shape)} != model {tuple(p.shape)}")
                p.copy_(tensors[name].to(p.dtype))


def adapter_dir(spec: str | os.PathLike) -> Path | None:
    """The adapter directory ``spec`` names (a shipped name or a directory with an adapter
    config), or None when it names something else, such as a base model. A directory with
    adapter weights but no config is refused (``AdapterFileError``): taken for a base model, it
    would fail later with the base loader's message about a missing config.json."""
    if str(spec) in SHIPPED_ADAPTERS:
        return SHIPPED_ADAPTERS[str(spec)]
    path = Path(spec)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterFileError(
            f"{path} holds {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}: the adapter is incomplete; copy its "
            f"{ADAPTER_CONFIG} back beside the weights (or save the model again with save_pretrained)"
        )
    return None


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = adapter_dir(directory) or directory
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"no AllMem adapter at {directory}: {ADAPTER_CONFIG} is missing (create one with "
            "`allmem convert ... --out DIR` or model.save_pretrained(DIR))"
        )
    fix = "restore it from the adapter's source or save the model again with save_pretrained"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(meta).__name__}, not an object; {fix}")
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(f"{path} has format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}; {fix}")
    missing = [key for key, kind in _ADAPTER_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if missing:
        raise AdapterFileError(f"{path} lacks {', '.join(missing)} (or holds the wrong type); {fix}")
    try:  # the settings are checked here, before any base model is loaded
        AllMemConfig.from_dict(meta["allmem"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return meta


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``export_pretrained`` (config.json of model_type "allmem")."""
    config = Path(path) / CHECKPOINT_CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def from_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | None = None) -> AllMemForCausalLM:
    """Rebuild a model from a self-contained checkpoint (``export_pretrained``): the base from
    its saved config (in ``dtype``; None: the saved one), converted with the saved settings, then
    every weight from the file. Refused when a weight is missing, unexpected, misshapen or NaN/Inf."""
    from transformers import AutoTokenizer, GenerationConfig

    from .convert import convert
    from .loading import ATTN_IMPLEMENTATION

    path = Path(path)
    config = AllMemPretrainedConfig.from_pretrained(path)
    weights = path / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the checkpoint is incomplete; export it again")
    tensors = load_file(str(weights))
    bad = first_non_finite(tensors)
    if bad is not None:
        raise AdapterFileError(f"{weights} holds NaN or Inf values (in {bad}): the checkpoint is damaged; export it again")
    base_config = config.base_model_config()
    if dtype is None:
        saved = getattr(base_config, "dtype", None) or "float32"
        dtype = saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved).replace("torch.", ""))
    base = AutoModelForCausalLM.from_config(base_config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model = convert(base, AllMemConfig.from_dict(config.allmem), base_name=config.allmem_base)
    state = model.state_dict()
    if model.lm_head.weight is model.model.embed_tokens.weight:
        state.pop("lm_head.weight")  # tied: stored once, under the embeddings
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise AdapterMismatchError(f"{weights} does not fit its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, t in state.items():
            if t.shape != tensors[name].shape:
                raise AdapterMismatchError(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, the model {tuple(t.shape)}")
            t.copy_(tensors[name].to(t.dtype))
    model._signature = base_signature(base, base.config)  # of the loaded weights, for adapters saved later
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    model.eval()
    if (path / "tokenizer_config.json").is_file():
        model.tokenizer = AutoTokenizer.from_pretrained(path)
    return model


# what every adapter config must hold (name -> JSON type); "dtype" is informational
_ADAPTER_FIELDS = {"base": str, "base_signature": dict, "allmem": dict}


def _alignment(real: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation putting each row's real tokens first (order kept) and its inverse.

    Real tokens must be contiguous in each row (left or right padding), otherwise the
    sequence would not be a sequence.
    """
    length = real.shape[1]
    first = real.float().argmax(1)
    idx = torch.arange(length, device=real.device)[None]
    expected = (idx >= first[:, None]) & (idx < (first + seq_lens)[:, None])
    if not bool((expected == real).all()):
        raise ValueError(
            "attention_mask must mark one contiguous run of real tokens per row (left or right padding); "
            "if generate() inferred the mask from a pad token that also occurs inside a prompt, pass attention_mask"
        )
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    return order, torch.argsort(order, dim=1)


# decoder layers whose forward is x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)), as
# decode_block runs them (Gemma 3 adds norms around both and keeps its own forward); a test holds each
# family's eager decode_block to its layer's forward, bit for bit
_PRENORM_DECODER_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})


def prenorm_decoder_layer(layer: torch.nn.Module) -> bool:
    """Whether a steady decode token takes ``decode_block`` through this decoder layer (not when a
    forward hook waits on it or a submodule: the block calls them as functions)."""
    # no hook anywhere in the layer covers the memory's hooks that fuses_steady_decode looks for
    return (type(layer).__name__ in _PRENORM_DECODER_LAYERS and isinstance(layer.self_attn.memory, AllMemMemory)
            and not has_forward_hooks(layer))


def decode_block(layer: torch.nn.Module, hidden: torch.Tensor, *mixer_inputs: torch.Tensor, **settings: Any):
    """One steady decode token through a whole pre-norm decoder layer: its input norm, the AllMem
    token mixer (``allmem.layer.decode_mixer``, the same inputs and settings), the residual, its
    post-attention norm, MLP and residual. hidden [B, 1, d] -> (hidden, then what the mixer returns
    after its output). The layer's own forward, op for op; one compiled graph for every layer under
    ``set_compiled`` (the norms, MLP and residuals fused with the mixer)."""
    mixed, *rest = decode_mixer(layer.self_attn, layer.input_layernorm(hidden), *mixer_inputs, **settings)
    hidden = hidden + mixed
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), *rest


_DECODE_BLOCK = {"fn": decode_block}


def set_compiled(enabled: bool = True) -> None:
    """Decode through ``torch.compile``: each steady decode token's decoder layer as one graph shared
    by every layer (``decode_block``; for a family with another layer structure its token mixer,
    ``allmem.layer.set_compiled``), and the memory's chunk steps when a prompt is read. The first
    call of each shape compiles (seconds); results match eager to rounding, not bit for bit. False:
    eager. Also ``allmem.set_compiled``."""
    set_layer_compiled(enabled)
    _DECODE_BLOCK["fn"] = torch.compile(decode_block, dynamic=False) if enabled else decode_block


# a checkpoint written by export_pretrained loads with transformers' Auto classes once allmem is imported
AutoConfig.register(MODEL_TYPE, AllMemPretrainedConfig, exist_ok=True)
AutoModelForCausalLM.register(AllMemPretrainedConfig, AllMemForCausalLM, exist_ok=True)
