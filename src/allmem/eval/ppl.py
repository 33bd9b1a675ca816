"""Perplexity by position on long real text, for any list of systems.

Each system scores the same token windows (``docs`` windows of ``length`` tokens cut one after
the other from the text); the negative log-likelihood of every token is bucketed by its
position in the window, i.e. how many tokens precede it (token 0 has no prediction). A bucket's
perplexity is exp(mean NLL) over all its tokens in all windows. Going past the base model's
trained context (8k for SmolLM2) shows where full attention degrades and a constant-size state
must hold up.

Texts: ``heldout`` (the corpus's held-out documents, joined; about 29k SmolLM2 tokens),
``pydoc`` (all of pydoc_data.topics, about 110k tokens; the distillation recipes train on
part of it), ``essays`` (all Paul Graham essays, about 150k tokens), ``stdlib`` (Python
source files, never trained on; for windows past 29k tokens) or a text file.

Per-window NLLs are saved under ``out_dir/nll/`` (safetensors, one tensor ``nll``) as they are
computed, so a rerun (or adding a system) only computes what is missing. No pickle is read:
a ``.pt`` left by an older version is ignored and its window scored again. Outputs: ``ppl.json``, ``ppl.md``, ``ppl.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .common import check_run_settings, format_table
from .systems import System, load_system, parse_spec, slug

DEFAULT_EDGES = (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SOURCES = ("heldout", "pydoc", "essays", "stdlib")


def bucket_edges(length: int, edges: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Buckets [a, b) of token positions covering 1..length-1: the given edges (default
    doubling from 256) cut at ``length``."""
    edges = sorted(set(DEFAULT_EDGES if edges is None else edges))
    if not edges or edges[0] != 0:
        edges = [0, *edges]
    bounds = [e for e in edges if e < length] + [length]
    return list(zip(bounds[:-1], bounds[1:]))


def bucket_label(lo: int, hi: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"[{short(lo)}, {short(hi)})"


def bucket_sums(nll: torch.Tensor, buckets: Sequence[tuple[int, int]]) -> list[tuple[float, int]]:
    """(sum of NLL, token count) per bucket; ``nll[i]`` is the NLL of the token at position i + 1."""
    out = []
    for lo, hi in buckets:
        part = nll[max(lo - 1, 0) : max(hi - 1, 0)]
        out.append((float(part.double().sum()), int(part.numel())))
    return out


def load_text(source: str = "heldout", text_file: str | Path | None = None) -> str:
    """The text to score: a file, or one of SOURCES from ``allmem.corpus``."""
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        return path.read_text(encoding="utf-8", errors="replace")
    from .. import corpus

    if source == "heldout":
        return "\n\n".join(d.text for d in corpus.documents("heldout"))
    if source == "pydoc":
        return corpus.long_document()
    if source == "essays":
        return "\n\n".join(d.text for d in corpus.essay_documents())
    if source == "stdlib":
        return corpus.stdlib_source()
    raise ValueError(f"unknown text source {source!r}; choose from {SOURCES} or give a text file")


def token_windows(tokenizer: Any, text: str, length: int, docs: int = 1) -> list[list[int]]:
    """``docs`` consecutive, non-overlapping windows of ``length`` tokens from the start of ``text``."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if len(ids) < length * docs:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than {docs} window(s) of {length}; use a longer text "
            "(--text-file, or --source pydoc / essays) or fewer/shorter windows"
        )
    return [ids[i * length : (i + 1) * length] for i in range(docs)]


@dataclass
class PplResult:
    """Perplexity per column (a system, or "system @ length" with several lengths) and bucket."""

    ppl: dict[str, dict[str, float]]
    tokens: dict[str, dict[str, int]]
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    context_length: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "tokens": self.tokens, "curves": self.curves, "settings": self.settings,
                "context_length": self.context_length}

    def markdown(self) -> str:
        head = (f"Perplexity by position (tokens before the predicted one), {self.settings.get('docs')} window(s) "
                f"of {', '.join(map(str, self.settings.get('lengths', [])))} tokens of "
                f"{self.settings.get('text')}; last row: all positions.\n\n")
        return head + format_table(self.ppl, row_label="position")


def _nll_path(out_dir: Path, system_name: str, length: int, index: int) -> Path:
    return out_dir / "nll" / f"{slug(system_name)}__{length}__{index}.safetensors"


def _load_nll(path: Path) -> torch.Tensor:
    try:
        return load_file(str(path))["nll"]
    except Exception as exc:  # truncated / foreign file: say which and how to recover
        raise ValueError(f"{path} cannot be read ({exc}); delete it and rerun to score that window again") from exc


def run_ppl(
    systems: Sequence[str | System],
    out_dir: str | Path,
    *,
    lengths: Sequence[int] = (16384,),
    edges: Sequence[int] | None = None,
    source: str = "heldout",
    text_file: str | Path | None = None,
    text: str | None = None,
    docs: int = 1,
    progress: bool = True,
    plot: bool = True,
) -> PplResult:
    """Score every system on the same windows; write ppl.json, ppl.md and (``plot``) ppl.png.

    ``systems`` are specs (loaded one at a time, then dropped) or System objects. Windows are
    cut with the first system's tokenizer, so systems compared here must share a tokenizer
    (they do when they share a base model).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if text is None:
        text = load_text(source, text_file)
        what = str(text_file) if text_file is not None else source
    else:
        what = "given text"
    lengths = sorted(set(int(n) for n in lengths))
    if not lengths or lengths[0] < 2:
        raise ValueError("lengths must be at least 2 tokens")
    settings = {"benchmark": "ppl", "text": what, "text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
                "lengths": lengths, "docs": docs}
    check_run_settings(out_dir, settings)
    names = [parse_spec(s).name if isinstance(s, str) else s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"two systems share a name: {names}; add name=... to a spec")
    many = len(lengths) > 1
    ppl: dict[str, dict[str, float]] = {}
    tokens: dict[str, dict[str, int]] = {}
    curves: dict[str, list[tuple[int, int, float]]] = {}
    windows: dict[int, list[list[int]]] | None = None
    context_length = None
    for item, name in zip(systems, names):
        missing = [(n, i) for n in lengths for i in range(docs) if not _nll_path(out_dir, name, n, i).is_file()]
        system = None
        if missing:
            system = load_system(item) if isinstance(item, str) else item
            context_length = context_length or system.context_length
            if windows is None:
                windows = {n: token_windows(system.tokenizer, text, n, docs) for n in lengths}
        total = sum(n for n, _ in missing)
        bar = tqdm(total=total, desc=f"ppl {name}", unit="tok", disable=not progress or not missing, dynamic_ncols=True)
        for n, i in missing:
            nll = system.token_nlls(windows[n][i], on_segment=bar.update).float()
            path = _nll_path(out_dir, name, n, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"nll": nll.contiguous().cpu()}, str(tmp))
            tmp.replace(path)
        bar.close()
        for n in lengths:
            buckets = bucket_edges(n, edges)
            sums = [[0.0, 0] for _ in buckets]
            everything = [0.0, 0]
            for i in range(docs):
                nll = _load_nll(_nll_path(out_dir, name, n, i))
                if nll.numel() != n - 1:
                    raise ValueError(f"{_nll_path(out_dir, name, n, i)} holds {nll.numel()} values, expected {n - 1}")
                for acc, (s, c) in zip(sums, bucket_sums(nll, buckets)):
                    acc[0] += s
                    acc[1] += c
                everything[0] += float(nll.double().sum())
                everything[1] += nll.numel()
            column = f"{name} @ {n}" if many else name
            ppl[column] = {bucket_label(lo, hi): round(math.exp(s / c), 2) for (lo, hi), (s, c) in zip(buckets, sums) if c}
            ppl[column]["all"] = round(math.exp(everything[0] / everything[1]), 2)
            tokens[column] = {bucket_label(lo, hi): c for (lo, hi), (_, c) in zip(buckets, sums) if c}
            curves[column] = [(lo, hi, math.exp(s / c)) for (lo, hi), (s, c) in zip(buckets, sums) if c]
        if system is not None and isinstance(item, str):
            system.close()
    previous = out_dir / "ppl.json"
    if context_length is None and previous.is_file():  # nothing recomputed: keep what the last run knew
        context_length = json.loads(previous.read_text(encoding="utf-8")).get("context_length")
    result = PplResult(ppl, tokens, out_dir, settings, curves, context_length)
    (out_dir / "ppl.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "ppl.md").write_text(result.markdown(), encoding="utf-8")
    if plot:
        plot_ppl(result, out_dir / "ppl.png")
    return result


def plot_ppl(result: PplResult, path: str | Path) -> Path:
    """Perplexity against position (log scale), one line per column; the base model's trained
    context as a dashed line. Needs matplotlib (``pip install allmem[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the perplexity plot needs matplotlib: pip install matplotlib (or allmem[plot])") from err
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for column, curve in result.curves.items():
        # one step per bucket (its perplexity over its positions), a marker at its geometric centre
        edges = [max(curve[0][0], 1)] + [hi for _, hi, _ in curve]
        values = [v for *_, v in curve]
        (line,) = ax.plot([math.sqrt(a * b) for a, b in zip(edges[:-1], edges[1:])], values, "o", markersize=4)
        ax.stairs(values, edges, color=line.get_color(), label=column, linewidth=1.8, baseline=None)
    if result.context_length:
        ax.axvline(result.context_length, color="grey", linestyle="--", linewidth=1)
        ax.text(result.context_length, ax.get_ylim()[1], " trained context", va="top", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    first = min((curve[0][1] for curve in result.curves.values()), default=2)
    ax.set_xlim(left=max(1, first / 8))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("position in the window (tokens before the predicted one), log scale")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity by position: {result.settings.get('text', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
