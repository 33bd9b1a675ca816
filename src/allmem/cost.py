"""Analytic FLOPs and cache bytes: full attention vs SWA + sinks vs AllMem (paper, fig. 3).

Pure functions of a Hugging Face-style model config (a ``transformers.PretrainedConfig`` or
a plain dict with ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``vocab_size``), an AllMem
setting (window W, sinks S, chunk C, expansion e, memory heads H, memory head dim d_h) and a
context length L. Nothing here builds a model or touches torch.

Counting convention (the one of the nanoGPT / Chinchilla "6N" estimates): **2 FLOPs per
multiply-add** of every matrix product (and of the depthwise memory conv); elementwise work
(softmax, norms, activations, RoPE, the per-chunk renormalisation / clipping / momentum of
the fast weights) is not counted. Attention counts only the (query, key) pairs a causal /
windowed kernel must compute (FlashAttention's causal convention), not a dense L x L square.

Notation: d hidden, n_l layers, H_q query heads, H_kv key/value heads, d_k attention head
dim, I MLP width, V vocabulary; memory: H heads (default H_kv), d_h head dim (default d_k),
D = H * d_h, F = e * d_h, K the conv kernel (4).

Per token and layer (forward):

    attention projections     A_p = 2 d (2 H_q d_k + 2 H_kv d_k)          (q, k, v, o)
    attention per key         A_k = 4 H_q d_k                              (q.k and p.v)
    MLP (SwiGLU)              M   = 6 d I
    LM head (once per token)  E   = 2 d V
    memory, every token       R   = 2 d D * 5 + 4 d H + 6 K D + 6 H F d_h
                                    (q, k, v, gate, o; eta, beta; conv on q|k|v; the read f(q))
    memory, per written key   U   = 14 H F d_h
                                    (f on the keys: 3 matmuls; closed-form gradients of
                                     W2 and of the hidden layer, then of W1 and W3: 4 matmuls)

Key counts (pairs) of a causal prefill over L tokens, query t = 0 .. L-1:

    full         P_full(L)   = L (L + 1) / 2                                (query t sees t + 1 keys)
    SWA + sinks  P_win(L)    = g(L, W) + g(L - W, S),  g(n, c) = sum_{m=1..n} min(m, c)
                 (query t sees min(t + 1, W) window keys and min(S, max(0, t - W + 1))
                  sinks that have left the window)

Prefill FLOPs over L tokens (token mixer, all layers):

    full     n_l (L A_p + P_full(L) A_k)
    SWA      n_l (L A_p + P_win(L) A_k)
    AllMem   SWA + n_l (L R + C floor(L / C) U)     (a partial last chunk is read, not written)

Decode FLOPs of one token at context L (the L-th token; it sees L keys, itself included):

    full     n_l (A_p + L A_k)
    SWA      n_l (A_p + (min(L, W) + min(S, max(0, L - W))) A_k)
    AllMem   SWA + n_l (R + U)      (U amortised: the write runs once every C tokens, on C keys)

The real prefill kernel (``ops.swa.swa_blocked``) computes whole query blocks of b = min(W, 128)
queries against W + b window keys and S sinks, so it spends about (W + b + S) / (W + S) of
the ideal window pairs (3 % more at W 4096); the count above is the ideal kernel's.

The rest of the model is the same for all three: n_l M + E per token (prefill counts the
LM head on all L positions, as a plain forward does). So prefill(L) = sum of decode(1..L)
for the attention, and the model totals are mixer + rest.

Cache bytes after L tokens (b = bytes per element, bi = bytes per index, batch 1):

    full     n_l 2 L H_kv d_k b                                            (grows with L)
    SWA      n_l 2 min(L, S + W) H_kv d_k b                                (a sized-to-content window)
    AllMem   n_l [ 2 (S + W) H_kv d_k b                                    (sink + ring keys/values)
                   + (2 * 3 H F d_h + 2 H C d_h + 2 H C + (K - 1) 3 D) b_s  (fast weights, momentum,
                                                                             partial chunk k, v, eta, beta, conv)
                   + (S + W + 1) bi ]                                      (slot positions, chunk fill)
             + bi                                                          (tokens seen)

AllMem's cache is allocated at full size on the first token and never changes (that is what
``AllMemCache.nbytes()`` measures; b_s is the state dtype: the memory keeps its state in at least
float32 whatever the model dtype, so b_s = max(b, 4) by default).

Memory parameters per layer (what ``model.memory_parameters()`` holds):

    5 d D (q, k, v, gate, o) + 3 K D (conv) + 2 D (q/k RMSNorm) + 2 (d H + H) (eta, beta)
    + 3 H F d_h (W1^0, W2^0, W3^0) + D (output RMSNorm) + d (alpha)
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

ARCHS = ("full", "swa", "allmem")
ARCH_LABELS = {"full": "full attention", "swa": "SWA + sinks", "allmem": "AllMem"}
PHASES = ("prefill", "decode")
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float8": 1, "fp8": 1}
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PAPER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the cost model needs, read from a HF-style config."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


@dataclass(frozen=True)
class AllMemSetting:
    """Window W, sinks S, chunk C and the memory's size. Defaults: the paper's fig. 3 (W 4096,
    C 2048; the paper does not give S, 64 here) and the memory of ALLMEM_SPEC.md (H = key/value
    heads, d_h = head_dim, e = 1, conv kernel 4). ``state_dtype_bytes`` overrides the element
    size of the memory state (fast weights, momentum, partial chunk, conv) in the cache."""

    window: int = 4096
    sinks: int = 64
    chunk: int = 2048
    expansion: int = 1
    memory_heads: int | None = None
    memory_head_dim: int | None = None
    conv_kernel: int = 4
    state_dtype_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("window", "chunk", "expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if not isinstance(self.conv_kernel, int) or self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be an integer >= 0, got {self.conv_kernel!r}")

    @classmethod
    def coerce(cls, setting: Any = None) -> "AllMemSetting":
        """None (the defaults), an AllMemSetting, an ``allmem.AllMemConfig`` or a dict."""
        if setting is None:
            return cls()
        if isinstance(setting, cls):
            return setting
        known = {f.name for f in fields(cls)}
        if isinstance(setting, Mapping):
            unknown = sorted(set(setting) - known)
            if unknown:
                raise ValueError(f"unknown AllMem setting fields {unknown}; known: {sorted(known)}")
            return cls(**setting)
        # an AllMemConfig (or anything with the same attribute names)
        return cls(**{name: getattr(setting, name) for name in known if hasattr(setting, name)})


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def model_shape(config: Any, name: str | None = None) -> ModelShape:
    """Normalise a PretrainedConfig / dict (or a ModelShape) into a ModelShape.

    Multimodal configs use their ``text_config``; head_dim defaults to hidden / heads and
    num_key_value_heads to num_attention_heads, as in transformers.
    """
    if isinstance(config, ModelShape):
        return config
    if not isinstance(config, Mapping) and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    elif isinstance(config, Mapping) and isinstance(config.get("text_config"), Mapping):
        config = {**config["text_config"], "name": config.get("name")}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
               if _get(config, k) is None]
    if missing:
        raise ValueError(f"model config lacks {missing}; give a decoder config with hidden_size, num_hidden_layers, "
                         "num_attention_heads, num_key_value_heads, head_dim, intermediate_size and vocab_size")
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    label = name or _get(config, "name") or _get(config, "_name_or_path") or _get(config, "model_type") or "model"
    return ModelShape(
        name=str(label),
        hidden_size=hidden,
        num_layers=int(_get(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(_get(config, "num_key_value_heads", heads)),
        head_dim=int(_get(config, "head_dim", hidden // heads)),
        intermediate_size=int(_get(config, "intermediate_size")),
        vocab_size=int(_get(config, "vocab_size")),
    )


def _memory_dims(shape: ModelShape, s: AllMemSetting) -> tuple[int, int, int, int, int]:
    """(H, d_h, D, F, K) of the memory, with the converter's defaults (layer.py)."""
    heads = s.memory_heads or shape.num_kv_heads
    head_dim = s.memory_head_dim or shape.head_dim
    return heads, head_dim, heads * head_dim, s.expansion * head_dim, max(s.conv_kernel, 1)


# ------------------------------------------------------------- attention pairs
def _g(n: int, c: int) -> int:
    """sum_{m=1..n} min(m, c); 0 for n <= 0."""
    if n <= 0 or c <= 0:
        return 0
    if n <= c:
        return n * (n + 1) // 2
    return c * (c + 1) // 2 + (n - c) * c


def attention_pairs(length: int, window: int | None = None, sinks: int = 0) -> int:
    """(query, key) pairs of a causal prefill over ``length`` tokens; window None = full."""
    if window is None:
        return length * (length + 1) // 2
    return _g(length, window) + _g(length - window, sinks)


def decode_pairs(length: int, window: int | None = None, sinks: int = 0) -> int:
    """Keys seen by the ``length``-th token (itself included); window None = full."""
    if window is None:
        return length
    return min(length, window) + min(sinks, max(0, length - window))


# ------------------------------------------------------------------- FLOPs
def per_token_flops(config: Any, setting: Any = None) -> dict[str, int]:
    """The per-token, per-layer terms of the module docstring: A_p, A_k, M, E, R, U."""
    m = model_shape(config)
    s = AllMemSetting.coerce(setting)
    heads, head_dim, width, feat, kernel = _memory_dims(m, s)
    d = m.hidden_size
    return {
        "attn_proj": 2 * d * (2 * m.num_heads * m.head_dim + 2 * m.num_kv_heads * m.head_dim),
        "attn_per_key": 4 * m.num_heads * m.head_dim,
        "mlp": 6 * d * m.intermediate_size,
        "lm_head": 2 * d * m.vocab_size,
        "memory_per_token": 2 * d * width * 5 + 4 * d * heads + 6 * kernel * width + 6 * heads * feat * head_dim,
        "memory_per_written_key": 14 * heads * feat * head_dim,
    }


def flops(config: Any, length: int, setting: Any = None, *, arch: str = "allmem", phase: str = "prefill") -> dict[str, int]:
    """FLOPs of the whole model for ``arch`` in ``full | swa | allmem``.

    phase ``prefill``: one forward over ``length`` tokens; ``decode``: one token at context
    ``length`` (amortised memory write). Returns ``attn_proj``, ``attn_core``, ``memory``,
    ``mixer`` (their sum: the token mixer), ``mlp``, ``lm_head``, ``rest`` and ``total``,
    all summed over layers. Formulas: module docstring.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    m = model_shape(config)
    s = AllMemSetting.coerce(setting)
    t = per_token_flops(m, s)
    window = None if arch == "full" else s.window
    prefill = phase == "prefill"
    tokens = length if prefill else 1
    pairs = (attention_pairs if prefill else decode_pairs)(length, window, s.sinks)
    n = m.num_layers
    memory = 0
    if arch == "allmem":
        written = s.chunk * (length // s.chunk) if prefill else 1
        memory = n * (tokens * t["memory_per_token"] + written * t["memory_per_written_key"])
    out = {
        "attn_proj": n * tokens * t["attn_proj"],
        "attn_core": n * pairs * t["attn_per_key"],
        "memory": memory,
        "mlp": n * tokens * t["mlp"],
        "lm_head": tokens * t["lm_head"],
    }
    out["mixer"] = out["attn_proj"] + out["attn_core"] + out["memory"]
    out["rest"] = out["mlp"] + out["lm_head"]
    out["total"] = out["mixer"] + out["rest"]
    return out


# ------------------------------------------------------------------- cache
def cache_bytes(
    config: Any,
    length: int,
    setting: Any = None,
    *,
    arch: str = "allmem",
    dtype_bytes: int = 2,
    index_bytes: int = 8,
    batch: int = 1,
) -> dict[str, int]:
    """Decode-cache bytes after ``length`` tokens, all layers.

    Returns ``kv`` (attention keys/values), ``memory_state`` (fast weights, momentum, partial
    chunk, conv inputs), ``index`` (AllMemCache's int64 slot positions and counters) and
    ``total``. Full attention is a plain KV cache; SWA + sinks keeps min(L, S + W) tokens;
    AllMem is the constant-size ``AllMemCache`` (formulas: module docstring).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an integer >= 0, got {length!r}")
    m = model_shape(config)
    s = AllMemSetting.coerce(setting)
    n = m.num_layers
    per_token_kv = 2 * m.num_kv_heads * m.head_dim * dtype_bytes
    state = index = 0
    if arch == "full":
        kv = n * length * per_token_kv
    elif arch == "swa":
        kv = n * min(length, s.sinks + s.window) * per_token_kv
    else:
        heads, head_dim, width, feat, kernel = _memory_dims(m, s)
        state_bytes = s.state_dtype_bytes or max(dtype_bytes, 4)  # the state is at least float32
        kv = n * (s.sinks + s.window) * per_token_kv
        elements = (2 * 3 * heads * feat * head_dim  # fast weights W1, W2, W3 and their momentum
                    + 2 * heads * s.chunk * head_dim  # partial chunk keys and values
                    + 2 * heads * s.chunk  # partial chunk eta and beta logits
                    + (kernel - 1) * 3 * width)  # conv inputs of q | k | v
        state = n * elements * state_bytes
        index = (n * (s.sinks + s.window + 1) + 1) * index_bytes  # slot positions, chunk fill; tokens seen
    out = {"kv": kv * batch, "memory_state": state * batch, "index": index * batch}
    out["total"] = out["kv"] + out["memory_state"] + out["index"]
    return out


def memory_parameter_count(config: Any, setting: Any = None) -> int:
    """Extra (trainable) parameters of the converted model: memory modules and alpha."""
    m = model_shape(config)
    s = AllMemSetting.coerce(setting)
    heads, head_dim, width, feat, kernel = _memory_dims(m, s)
    d = m.hidden_size
    per_layer = (5 * d * width + 3 * kernel * width + 2 * width + 2 * (d * heads + heads)
                 + 3 * heads * feat * head_dim + width + d)
    return m.num_layers * per_layer


# ------------------------------------------------------------------- table
def cost_table(
    config: Any,
    lengths: Iterable[int] = PAPER_LENGTHS,
    allmem_setting: Any = None,
    dtype_bytes: int = 2,
    *,
    name: str | None = None,
) -> list[dict]:
    """One row per context length: FLOPs (prefill of L tokens, decode of one token at L),
    token mixer and whole model, and cache bytes, for full / SWA + sinks / AllMem, with the
    AllMem / full ratios. Keys: ``{prefill,decode}_{mixer,total}_flops_{full,swa,allmem}``,
    ``cache_bytes_{full,swa,allmem}``, ``{prefill,decode}_{mixer,total}_ratio``,
    ``cache_ratio``, plus the model name, length, setting and memory parameter count."""
    m = model_shape(config, name)
    s = AllMemSetting.coerce(allmem_setting)
    params = memory_parameter_count(m, s)
    rows = []
    for length in lengths:
        length = int(length)
        row: dict[str, Any] = {
            "model": m.name, "length": length, "window": s.window, "sinks": s.sinks, "chunk": s.chunk,
            "expansion": s.expansion, "dtype_bytes": dtype_bytes, "memory_params": params,
        }
        for phase in PHASES:
            for arch in ARCHS:
                f = flops(m, length, s, arch=arch, phase=phase)
                row[f"{phase}_mixer_flops_{arch}"] = f["mixer"]
                row[f"{phase}_total_flops_{arch}"] = f["total"]
            for part in ("mixer", "total"):
                row[f"{phase}_{part}_ratio"] = row[f"{phase}_{part}_flops_allmem"] / row[f"{phase}_{part}_flops_full"]
        for arch in ARCHS:
            row[f"cache_bytes_{arch}"] = cache_bytes(m, length, s, arch=arch, dtype_bytes=dtype_bytes)["total"]
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
    p.add_argument("--window", type=int, default=4096, help="sliding window W (default 4096, as in the paper's fig. 3)")
    p.add_argument("--sinks", type=int, default=64, help="sink tokens S (default 64)")
    p.add_argument("--chunk", type=int, default=2048, help="memory chunk C (default 2048, as in the paper's fig. 3)")
    p.add_argument("--expansion", type=int, default=1, help="SwiGLU expansion e of the fast weights (default 1)")
    p.add_argument("--memory-heads", type=int, default=None, help="memory heads H (default: key/value heads)")
    p.add_argument("--memory-head-dim", type=int, default=None, help="memory head dim d_h (default: head_dim)")
    p.add_argument("--dtype", type=_dtype_bytes, default=2, metavar="DTYPE",
                   help="cache element type: bfloat16 (default), float16, float32, fp8, or a byte count")
    p.add_argument("--plot", metavar="PNG", help="also write a fig.-3-style plot (needs matplotlib)")
    p.add_argument("--markdown", metavar="MD", help="also write the table to this markdown file")
    p.set_defaults(func=cmd_cost)
    return p


def cmd_cost(args) -> int:
    try:
        setting = AllMemSetting(window=args.window, sinks=args.sinks, chunk=args.chunk, expansion=args.expansion,
                                memory_heads=args.memory_heads, memory_head_dim=args.memory_head_dim)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if any(n < 1 for n in args.lengths):
        raise SystemExit("error: --lengths must be positive integers")
    rows_by_model: dict[str, list[dict]] = {}
    for spec in args.config:
        try:
            config = load_model_config(spec)
            rows = cost_table(config, args.lengths, setting, args.dtype)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
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
        try:
            plot_cost(rows_by_model, args.plot)
        except ImportError:
            raise SystemExit("error: --plot needs matplotlib: pip install 'allmem[plot]'") from None
        print(f"wrote {args.plot}")
    return 0


__all__ = [
    "AllMemSetting", "ModelShape", "attention_pairs", "bundled_configs", "cache_bytes", "cost_table",
    "decode_pairs", "flops", "format_cost_table", "load_model_config", "memory_parameter_count", "model_shape",
    "per_token_flops", "plot_cost", "register",
]
