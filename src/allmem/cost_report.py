"""The cost report: model configs by name, tables, the fig. 3 plot and ``allmem cost``.

The numbers come from the formulas in ``allmem.cost``; this module only finds model configs,
lays the numbers out (a markdown table, a matplotlib figure) and parses the command line.
docs/cost/ is its output (``allmem cost --config qwen3-0.6b qwen3-1.7b --plot ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import AllMemConfig
from .constants import PACKAGE_DIR
from .cost import ARCHS, PHASES, cache_bytes, flops, memory_parameter_count, model_shape

ARCH_LABELS = {"full": "full attention", "swa": "SWA + sinks", "allmem": "AllMem"}
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float8": 1, "fp8": 1}
CONFIG_DIR = PACKAGE_DIR / "model_configs"
PAPER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
PAPER_CONFIG = AllMemConfig(window=4096, sinks=64, chunk=2048)
"""The paper's fig. 3 setting: window 4096, chunk 2048; the paper does not give S, 64 here."""


# --------------------------------------------------------------- configs
def bundled_configs() -> dict[str, Path]:
    """Model configs shipped in ``allmem/model_configs`` (name -> file)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def load_model_config(spec: str) -> dict | Any:
    """A bundled config name or alias (``qwen3-0.6b``, ``smollm2``, ``Qwen/Qwen3-1.7B`` ...), a
    JSON file (a HF ``config.json`` or one of ours), or a local model directory / hub id
    (read with ``transformers.AutoConfig``). Returns a dict or a PretrainedConfig."""
    key = spec.strip().lower()
    for stem, file in bundled_configs().items():
        data = json.loads(file.read_text())
        names = [stem, data.get("name", ""), data.get("hub_id", ""), *data.get("aliases", [])]
        if key in (n.lower() for n in names if n):
            return data
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{spec} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{spec} holds a JSON {type(data).__name__}, not a model config object; give a "
                             "config.json with hidden_size, num_hidden_layers, ...")
        data.setdefault("name", path.parent.name if path.name == "config.json" else path.stem)
        return data
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec} is a directory without a config.json")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not path.is_dir() and not looks_like_hub_id:
        raise FileNotFoundError(
            f"no model config {spec!r}: give a bundled name ({', '.join(bundled_configs())}), a JSON file, "
            "a local model directory or a hub id (owner/name)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else spec)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"could not read the config of {spec!r}: {exc}") from None
    if not getattr(config, "name", None):
        config.name = path.name if path.is_dir() else spec.split("/")[-1]
    return config


# ------------------------------------------------------------------- table
def cost_table(
    model_config: Any,
    lengths: Iterable[int] = PAPER_LENGTHS,
    allmem_config: AllMemConfig = PAPER_CONFIG,
    dtype_bytes: int = 2,
    *,
    name: str | None = None,
) -> list[dict]:
    """One row per context length: FLOPs (prefill of L tokens, decode of one token at L),
    token mixer and whole model, and cache bytes, for full / SWA + sinks / AllMem, with the
    AllMem / full ratios. Keys: ``{prefill,decode}_{mixer,total}_flops_{full,swa,allmem}``,
    ``cache_bytes_{full,swa,allmem}``, ``{prefill,decode}_{mixer,total}_ratio``,
    ``cache_ratio``, plus the model name, length, setting and memory parameter count.
    ``allmem_config`` defaults to the paper's fig. 3 setting (``PAPER_CONFIG``)."""
    m = model_shape(model_config, name)
    c = allmem_config
    params = memory_parameter_count(m, c)
    rows = []
    for length in lengths:
        length = int(length)
        row: dict[str, Any] = {
            "model": m.name, "length": length, "window": c.window, "sinks": c.sinks, "chunk": c.chunk,
            "expansion": c.expansion, "dtype_bytes": dtype_bytes, "memory_params": params,
        }
        for phase in PHASES:
            for arch in ARCHS:
                f = flops(m, length, c, arch=arch, phase=phase)
                row[f"{phase}_mixer_flops_{arch}"] = f["mixer"]
                row[f"{phase}_total_flops_{arch}"] = f["total"]
            for part in ("mixer", "total"):
                row[f"{phase}_{part}_ratio"] = row[f"{phase}_{part}_flops_allmem"] / row[f"{phase}_{part}_flops_full"]
        for arch in ARCHS:
            row[f"cache_bytes_{arch}"] = cache_bytes(m, length, c, arch=arch, dtype_bytes=dtype_bytes)["total"]
        row["cache_ratio"] = row["cache_bytes_allmem"] / row["cache_bytes_full"]
        rows.append(row)
    return rows


def _flops_str(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _bytes_str(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{int(x)} B"


def _ratio_str(r: float) -> str:
    if r <= 0:
        return "0"
    return f"{r:.3f} (1/{1 / r:.1f})" if r < 1 else f"{r:.3f}"


def _length_str(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_cost_table(rows: list[dict]) -> str:
    """A markdown table of ``cost_table`` rows (several models may be mixed), with a legend."""
    header = [
        "model", "context",
        "prefill FLOPs, token mixer: full / SWA+sinks / AllMem", "AllMem ÷ full",
        "prefill FLOPs, whole model: full / AllMem", "AllMem ÷ full",
        "decode FLOPs/token, token mixer: full / SWA+sinks / AllMem", "AllMem ÷ full",
        "cache: full / SWA+sinks / AllMem", "AllMem ÷ full",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        three = lambda key, fmt: " / ".join(fmt(r[f"{key}_{a}"]) for a in ARCHS)  # noqa: E731
        cells = [
            r["model"], _length_str(r["length"]),
            three("prefill_mixer_flops", _flops_str), _ratio_str(r["prefill_mixer_ratio"]),
            f"{_flops_str(r['prefill_total_flops_full'])} / {_flops_str(r['prefill_total_flops_allmem'])}",
            _ratio_str(r["prefill_total_ratio"]),
            three("decode_mixer_flops", _flops_str), _ratio_str(r["decode_mixer_ratio"]),
            three("cache_bytes", _bytes_str), _ratio_str(r["cache_ratio"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = []
    for r in rows:
        text = (f"{r['model']}: window {r['window']}, sinks {r['sinks']}, chunk {r['chunk']}, expansion "
                f"{r['expansion']}, {r['memory_params'] / 1e6:.1f}M memory parameters, cache elements of "
                f"{r['dtype_bytes']} bytes")
        if text not in settings:
            settings.append(text)
    lines += ["", *(f"- {t}" for t in settings),
              "- FLOPs: 2 per multiply-add of every matmul (nanoGPT/Chinchilla convention), causal pairs only, "
              "elementwise work not counted. Token mixer = attention projections + attention + memory; whole model "
              "adds the MLP and the LM head (on all L positions). Decode: one token at context L, the memory "
              "write amortised over the chunk. Cache: all layers, batch 1; AllMem's includes the window, the "
              "fast weights, momentum, partial chunk, conv inputs and int64 positions (`AllMemCache.nbytes()`)."]
    return "\n".join(lines) + "\n"



# -------------------------------------------------------------------- plot
def plot_cost(rows_by_model: Mapping[str, list[dict]] | list[dict], path: str | os.PathLike, *, title: str | None = None):
    """Write a PNG in the shape of the paper's fig. 3: for each model (a row of panels),
    token-mixer prefill FLOPs and cache bytes against context length, full attention vs
    SWA + sinks vs AllMem, log axes, with the AllMem / full ratio at the longest length.
    ``rows_by_model`` maps a model name to its ``cost_table`` rows (a flat list is grouped by
    its ``model`` key). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    if not isinstance(rows_by_model, Mapping):
        grouped: dict[str, list[dict]] = {}
        for r in rows_by_model:
            grouped.setdefault(r["model"], []).append(r)
        rows_by_model = grouped
    if not rows_by_model:
        raise ValueError("nothing to plot: no rows")
    styles = {"full": dict(color="#d62728", marker="o"), "swa": dict(color="#7f7f7f", marker="s", linestyle="--"),
              "allmem": dict(color="#1f77b4", marker="^")}
    panels = [("prefill_mixer_flops", "prefill_mixer_ratio", "token-mixer FLOPs (prefill, all layers)", 1e12, "TFLOPs"),
              ("cache_bytes", "cache_ratio", "decode cache (all layers)", 2**30, "GiB")]
    n = len(rows_by_model)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.6 * n + 0.8), squeeze=False)
    for i, (model, rows) in enumerate(rows_by_model.items()):
        rows = sorted(rows, key=lambda r: r["length"])
        xs = [r["length"] for r in rows]
        for j, (key, ratio_key, label, scale, unit) in enumerate(panels):
            ax = axes[i][j]
            for arch in ARCHS:
                ax.plot(xs, [r[f"{key}_{arch}"] / scale for r in rows], label=ARCH_LABELS[arch], **styles[arch])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([_length_str(x) for x in xs])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(unit)
            ax.set_title(f"{model}: {label}", fontsize=11)
            r = rows[-1]
            ax.annotate(f"AllMem / full at {_length_str(r['length'])}: {_ratio_str(r[ratio_key])}",
                        xy=(0.03, 0.95), xycoords="axes fraction", va="top", fontsize=9,
                        bbox=dict(boxstyle="round", fc="white", ec="0.8"))
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    r0 = next(iter(rows_by_model.values()))[0]
    fig.suptitle(title or f"window {r0['window']}, sinks {r0['sinks']}, chunk {r0['chunk']}, "
                           f"{r0['dtype_bytes']}-byte cache elements", fontsize=12)
    fig.legend(handles, labels, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.965), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



# --------------------------------------------------------------------- CLI
def _dtype_bytes(text: str) -> int:
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text.lower() not in DTYPE_BYTES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {sorted(DTYPE_BYTES)} or a byte count")
    return DTYPE_BYTES[text.lower()]


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``allmem cost`` to an argparse subparsers object (sets ``func=cmd_cost``)."""
    names = ", ".join(bundled_configs())
    p = subparsers.add_parser(
        "cost",
        help="analytic FLOPs and cache: full attention vs SWA + sinks vs AllMem (paper fig. 3)",
        description=(
            "Count FLOPs (prefill of L tokens and decode of one token at context L; token mixer and whole "
            "model) and decode-cache bytes of full attention, sliding-window attention with sinks, and AllMem, "
            "from a model config alone (no weights are loaded). FLOPs are 2 per multiply-add of every matmul "
            "(the nanoGPT/Chinchilla convention); the formulas are in the docstring of allmem.cost. "
            "Prints a markdown table; several --config values are compared in one table."),
        epilog=("examples:\n"
                "  allmem cost --config qwen3-0.6b\n"
                "  allmem cost --config qwen3-0.6b qwen3-1.7b --plot fig3.png --markdown cost.md\n"
                "  allmem cost --config path/to/config.json --lengths 8192 131072 --window 8192 --chunk 4096"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", nargs="+", action="extend", required=True, metavar="MODEL",
                   help=f"bundled name ({names}; aliases such as smollm2 or Qwen/Qwen3-0.6B work), a config "
                        "JSON file, a local model directory or a hub id; repeat or list several to compare")
    p.add_argument("--lengths", nargs="+", type=int, default=list(PAPER_LENGTHS), metavar="L",
                   help="context lengths in tokens (default: 4096 8192 ... 131072)")
    paper = PAPER_CONFIG
    p.add_argument("--window", type=int, default=paper.window,
                   help=f"sliding window W (default {paper.window}, as in the paper's fig. 3)")
    p.add_argument("--sinks", type=int, default=paper.sinks, help=f"sink tokens S (default {paper.sinks})")
    p.add_argument("--chunk", type=int, default=paper.chunk,
                   help=f"memory chunk C (default {paper.chunk}, as in the paper's fig. 3)")
    p.add_argument("--expansion", type=int, default=paper.expansion,
                   help=f"SwiGLU expansion e of the fast weights (default {paper.expansion})")
    p.add_argument("--memory-heads", type=int, default=None, help="memory heads H (default: key/value heads)")
    p.add_argument("--memory-head-dim", type=int, default=None, help="memory head dim d_h (default: head_dim)")
    p.add_argument("--dtype", type=_dtype_bytes, default=2, metavar="DTYPE",
                   help="cache element type: bfloat16 (default), float16, float32, fp8, or a byte count")
    p.add_argument("--plot", metavar="PNG", help="also write a fig.-3-style plot (needs matplotlib)")
    p.add_argument("--markdown", metavar="MD", help="also write the table to this markdown file")
    p.set_defaults(func=cmd_cost)
    return p


def cmd_cost(args: argparse.Namespace) -> int:
    """Run ``allmem cost``; bad input is one ``error:`` line on stderr and exit code 2."""
    try:
        return _report(args)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError; OSError: a missing or unwritable file
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace) -> int:
    bad = [n for n in args.lengths if n < 1]
    if bad:
        raise ValueError(f"--lengths must be positive token counts, got {bad}")
    allmem_config = AllMemConfig(window=args.window, sinks=args.sinks, chunk=args.chunk, expansion=args.expansion,
                                 memory_heads=args.memory_heads, memory_head_dim=args.memory_head_dim)
    if args.plot:  # checked first, so a missing matplotlib leaves no half-written output
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'allmem[plot]'") from None
    rows_by_model: dict[str, list[dict]] = {}
    for spec in args.config:
        rows = cost_table(load_model_config(spec), args.lengths, allmem_config, args.dtype)
        label = rows[0]["model"]
        if label in rows_by_model:  # two configs with the same name: tell them apart
            label = f"{label} ({spec})"
            rows = [{**r, "model": label} for r in rows]
        rows_by_model[label] = rows
    table = format_cost_table([r for rows in rows_by_model.values() for r in rows])
    print(table, end="")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_cost(rows_by_model, args.plot)
        print(f"wrote {args.plot}")
    return 0


__all__ = [
    "ARCH_LABELS", "DTYPE_BYTES", "PAPER_CONFIG", "PAPER_LENGTHS", "bundled_configs", "cmd_cost", "cost_table",
    "format_cost_table", "load_model_config", "plot_cost", "register",
]
