"""Analytic FLOPs and cache bytes: full attention vs SWA + sinks vs AllMem (paper, fig. 3).

Pure functions of a model's shape (``ModelShape``, read from a ``transformers.PretrainedConfig``
or a plain dict with ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``vocab_size``), an
``allmem.AllMemConfig`` (window W, sinks S, chunk C, expansion e, memory heads H, memory head
dim d_h, conv kernel K) and a context length L. Nothing here builds a model or touches torch;
the tables, the plot and ``allmem cost`` are in ``allmem.cost_report``.

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
the ideal window pairs (3 % more at W 4096); the count above is the ideal kernel's. CPU inference
(``ops.swa.swa_sdpa``) runs PyTorch's fused kernel on blocks of max(W, 128) queries against all
block + W keys of their band, masked: about twice the ideal pairs, less time at 1k tokens.

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

from dataclasses import dataclass
from typing import Any, Mapping

from .config import AllMemConfig

ARCHS = ("full", "swa", "allmem")
PHASES = ("prefill", "decode")


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


def _memory_dims(shape: ModelShape, config: AllMemConfig) -> tuple[int, int, int, int, int]:
    """(H, d_h, D, F, K) of the memory, with the converter's defaults (layer.py)."""
    if config.memory_type != "ttt":
        raise ValueError(f"the cost model counts the AllMem (TTT) memory, not memory_type={config.memory_type!r}; "
                         "give an AllMemConfig with memory_type='ttt'")
    heads = config.memory_heads or shape.num_kv_heads
    head_dim = config.memory_head_dim or shape.head_dim
    # conv_kernel 0 or 1: the memory still keeps a one-tap conv (memory.py), so K = 1
    return heads, head_dim, heads * head_dim, config.expansion * head_dim, max(config.conv_kernel, 1)


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
def _dense_flops(m: ModelShape) -> dict[str, int]:
    """A_p, A_k, M and E of the module docstring (per token and layer; E once per token)."""
    d = m.hidden_size
    return {
        "attn_proj": 2 * d * (2 * m.num_heads * m.head_dim + 2 * m.num_kv_heads * m.head_dim),
        "attn_per_key": 4 * m.num_heads * m.head_dim,
        "mlp": 6 * d * m.intermediate_size,
        "lm_head": 2 * d * m.vocab_size,
    }


def _memory_flops(m: ModelShape, config: AllMemConfig) -> dict[str, int]:
    """R and U of the module docstring (per token and layer)."""
    heads, head_dim, width, feat, kernel = _memory_dims(m, config)
    d = m.hidden_size
    return {
        "memory_per_token": 2 * d * width * 5 + 4 * d * heads + 6 * kernel * width + 6 * heads * feat * head_dim,
        "memory_per_written_key": 14 * heads * feat * head_dim,
    }


def per_token_flops(model_config: Any, allmem_config: AllMemConfig | None = None) -> dict[str, int]:
    """The per-token, per-layer terms of the module docstring: A_p, A_k, M, E, R, U.

    ``model_config``: a PretrainedConfig, a dict or a ModelShape; ``allmem_config`` None is
    ``AllMemConfig()``."""
    m = model_shape(model_config)
    return {**_dense_flops(m), **_memory_flops(m, allmem_config or AllMemConfig())}


def flops(model_config: Any, length: int, allmem_config: AllMemConfig | None = None, *, arch: str = "allmem",
          phase: str = "prefill") -> dict[str, int]:
    """FLOPs of the whole model for ``arch`` in ``full | swa | allmem``.

    phase ``prefill``: one forward over ``length`` tokens; ``decode``: one token at context
    ``length`` (amortised memory write). Returns ``attn_proj``, ``attn_core``, ``memory``,
    ``mixer`` (their sum: the token mixer), ``mlp``, ``lm_head``, ``rest`` and ``total``,
    all summed over layers. Window, sinks and the memory come from ``allmem_config`` (None:
    ``AllMemConfig()``). Formulas: module docstring.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    m = model_shape(model_config)
    c = allmem_config or AllMemConfig()
    t = _dense_flops(m)
    window = None if arch == "full" else c.window
    prefill = phase == "prefill"
    tokens = length if prefill else 1
    pairs = (attention_pairs if prefill else decode_pairs)(length, window, c.sinks)
    n = m.num_layers
    memory = 0
    if arch == "allmem":
        mem = _memory_flops(m, c)
        written = c.chunk * (length // c.chunk) if prefill else 1  # a partial last chunk is read, not written
        memory = n * (tokens * mem["memory_per_token"] + written * mem["memory_per_written_key"])
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
    model_config: Any,
    length: int,
    allmem_config: AllMemConfig | None = None,
    *,
    arch: str = "allmem",
    dtype_bytes: int = 2,
    state_bytes: int | None = None,
    index_bytes: int = 8,
    batch: int = 1,
) -> dict[str, int]:
    """Decode-cache bytes after ``length`` tokens, all layers.

    Returns ``kv`` (attention keys/values), ``memory_state`` (fast weights, momentum, partial
    chunk, conv inputs), ``index`` (AllMemCache's int64 slot positions and counters) and
    ``total``. Full attention is a plain KV cache; SWA + sinks keeps min(L, S + W) tokens;
    AllMem is the constant-size ``AllMemCache`` (formulas: module docstring). ``dtype_bytes``
    is the model's element size; ``state_bytes`` the memory state's, None = max(dtype_bytes, 4)
    as ``AllMemCache`` keeps it (at least float32).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an integer >= 0, got {length!r}")
    m = model_shape(model_config)
    c = allmem_config or AllMemConfig()
    n = m.num_layers
    per_token_kv = 2 * m.num_kv_heads * m.head_dim * dtype_bytes
    state = index = 0
    if arch == "full":
        kv = n * length * per_token_kv
    elif arch == "swa":
        kv = n * min(length, c.sinks + c.window) * per_token_kv
    else:
        heads, head_dim, width, feat, kernel = _memory_dims(m, c)
        kv = n * (c.sinks + c.window) * per_token_kv
        elements = (2 * 3 * heads * feat * head_dim  # fast weights W1, W2, W3 and their momentum
                    + 2 * heads * c.chunk * head_dim  # partial chunk keys and values
                    + 2 * heads * c.chunk  # partial chunk eta and beta logits
                    + (kernel - 1) * 3 * width)  # conv inputs of q | k | v
        state = n * elements * (state_bytes or max(dtype_bytes, 4))
        index = (n * (c.sinks + c.window + 1) + 1) * index_bytes  # slot positions, chunk fill; tokens seen
    out = {"kv": kv * batch, "memory_state": state * batch, "index": index * batch}
    out["total"] = out["kv"] + out["memory_state"] + out["index"]
    return out


def memory_parameter_count(model_config: Any, allmem_config: AllMemConfig | None = None) -> int:
    """Extra (trainable) parameters of the converted model: memory modules and alpha."""
    m = model_shape(model_config)
    heads, head_dim, width, feat, kernel = _memory_dims(m, allmem_config or AllMemConfig())
    d = m.hidden_size
    per_layer = (5 * d * width + 3 * kernel * width + 2 * width + 2 * (d * heads + heads)
                 + 3 * heads * feat * head_dim + width + d)
    return m.num_layers * per_layer


def register(subparsers):
    """``allmem cost`` lives in ``allmem.cost_report``; cli.py still imports it from here."""
    from .cost_report import register as register_report

    return register_report(subparsers)


__all__ = [
    "ARCHS", "PHASES", "ModelShape", "attention_pairs", "cache_bytes", "decode_pairs", "flops",
    "memory_parameter_count", "model_shape", "per_token_flops",
]
