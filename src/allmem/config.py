"""AllMemConfig: how a pretrained decoder is converted, as validated data."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

POSITION_MODES = ("rolling", "absolute")
INIT_MODES = ("attention", "random")
CONV_INITS = ("key_shift", "identity")
KEY_INITS = ("attention", "query")
OUTPUT_INITS = ("random", "attention")
INNER_LOSSES = ("mse", "dot")
MEMORY_TYPES = ("ttt", "mamba2")
MAX_TOKENS = 2**22
"""Bound on window, sinks, chunk and swa_block: a ring of W keys is allocated per layer, so a
typo such as 1e12 must fail here rather than as an out-of-memory error deep in a forward."""
MAX_WIDTH = 2**16
"""Bound on head counts, head widths, the SwiGLU expansion and the conv kernel."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON/YAML true is not 1


def _is_number(value: Any) -> bool:
    """A real finite number; "0.1" from a hand-edited JSON file is not one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


@dataclass(frozen=True)
class AllMemConfig:
    """Everything that defines a converted model besides the base weights.

    Defaults follow ALLMEM_SPEC.md; fields marked (ours) are choices the paper leaves open.
    """

    window: int = 256
    """W: tokens of sliding-window attention each query sees (itself included)."""
    sinks: int = 4
    """S: first tokens every query keeps attending to (StreamingLLM sinks)."""
    chunk: int = 128
    """C: tokens per memory update; keep C <= W so no token falls between window and memory."""
    positions: Literal["rolling", "absolute"] = "rolling"
    """(ours) rolling: sinks are seen at distance min(t, S+W-1) - j; absolute: true positions."""
    memory_heads: int | None = None
    """H: memory heads; None = the base model's key/value heads."""
    memory_head_dim: int | None = None
    """d_h: memory head width; None = the base model's head_dim."""
    expansion: int = 1
    """e: SwiGLU hidden width = e * d_h."""
    conv_kernel: int = 4
    """Short causal depthwise convolution after the q/k/v projections (0 or 1 disables)."""
    conv_init: Literal["key_shift", "identity"] = "key_shift"
    """(ours) how the short conv starts. key_shift: the key channels read the previous token
    (tap t-1 = 1), queries and values the current one, so each write stores k(x_{t-1}) -> v(x_t),
    the transition an induction head copies, and a query token reads back what followed it
    before. identity: every channel reads the current token, so a write stores k(x_t) -> v(x_t)
    and the key -> value pairing must be learned through the second-order path of the inner
    update; on MQAR that never happened in 2,000 steps (docs/mqar/README.md), key_shift
    reaches 99 % in 400. Only a fresh memory uses it: a loaded adapter brings its own taps.
    Without a conv (conv_kernel 0 or 1) there is no previous tap and both read the current token."""
    inner_loss: Literal["mse", "dot"] = "mse"
    base_lr: float = 0.1
    """(ours) initial token-wise inner learning rate eta."""
    momentum_init: float = 0.5
    """(ours) initial chunk-wise momentum beta."""
    clip: float | None = 1.0
    """(ours) tau: per-matrix clip on the Frobenius norm of the inner gradient; None disables."""
    norm_eps: float = 1e-5
    weight_norm: bool = True
    """True (the spec): before every write each row of the fast weights is rescaled to its initial
    norm. (ours) False writes on the weights as they are, so a skip-free read can grow to the values'
    size and a stored pair stops being rewritten. On random keys and values that keeps more (16 pairs
    read after 640 random writes: top-1 0.63 without, 0.19 with, at clip 1, base_lr 0.1, momentum
    0.9; docs/distill/recall/retention/retention.md); on SmolLM2's own activations it does not
    (benchmarks/needle_retention.py), and without the clip the fast weights diverge there within a few
    hundred tokens, so False needs ``clip``."""
    read_residual: bool = True
    """(ours) True: f_W(z) = z + W2(silu(W1 z) * W3 z) as in the spec. False drops the skip "+ z"
    from the read and from the inner loss, so a read returns only what the chunks wrote."""
    qk_scale: float = 1.0
    """(ours) factor on q and k after the per-head L2 normalisation (1 = the spec). sqrt(d_h)
    gives unit-variance entries, so the fast weights' pre-activations are O(1) instead of
    O(1/sqrt(d_h)) and a write moves the read by more than a few parts in a thousand."""
    init: Literal["attention", "random"] = "attention"
    """attention: memory k/v copy the attention's k_proj/v_proj, q the group mean of q_proj.
    With memory_type="mamba2" both modes give Mamba-2's own initialisation (nothing is copied)."""
    key_init: Literal["attention", "query"] = "attention"
    """(ours) where the memory's key projection starts. attention: as ``init`` says (the spec).
    query: a copy of the memory's query projection, so that with key_shift the fresh memory is
    an induction copy: q(x_t) . k(x_s) = q(x_t) . q(x_{s-1}) is largest where an earlier token
    equals the current one, and the read returns what followed it. With the attention's own
    k_proj, q . k scores the attention pattern, not token identity: on SmolLM2 passkey prompts the
    needle's key ranks ~5th of ~700 (among the digits) in the best heads even after 220 recall
    steps, with the copy it ranks 1st in most heads of layers 0-18 before any training
    (benchmarks/memory_addressing.py, docs/distill/recall/README.md). TTT memory only."""
    output_init: Literal["random", "attention"] = "random"
    """(ours) where the memory's output projection W_o starts. random: small random weights (the
    spec). attention: for each key/value group, the sum of the attention's o_proj columns of that
    group's query heads, so a read that returns a token's value writes to the residual stream what
    all of the group's query heads attending to that token would (the memory's query is their mean,
    its value the attention's v_proj). The memory's output is then in the attention's own output
    space from step 0 and alpha alone decides how much of it to add. TTT memory with init=attention."""
    centre: bool = False
    """(ours) subtract a per-channel mean from the memory's q, k and v features (after the conv and
    SiLU, before the norms): ``feature_mean``, a trainable [3 H d_h] vector of every layer, zero
    until ``allmem.calibrate_centre`` sets it to the features' mean on some text (the distill
    trainer does so for a fresh memory). SmolLM2's memory keys have mean pairwise cosine 0.6-0.9, so
    every write also overwrites the shared direction of all earlier ones; centred, a needle's value
    survives twice as long at a uniform write rate (benchmarks/needle_retention.py: cosine 0.14 vs
    0.07 after 488 tokens; 0.57 vs 0.33 when the filler writes 100x less). TTT memory only."""
    swa_block: int | None = None
    """Query block of the blocked prefill; None = min(W, 128)."""
    memory_type: Literal["ttt", "mamba2"] = "ttt"
    """ttt: the AllMem test-time-trained memory; mamba2: the paper's baseline, a Mamba-2 (SSD)
    mixer of about the same parameter count in its place (allmem.baselines.mamba2)."""
    mamba_heads: int | None = None
    """(mamba2) heads; None = chosen with mamba_state to match the TTT memory's parameter count."""
    mamba_head_dim: int | None = None
    """(mamba2) P: head width; None = the base model's head_dim."""
    mamba_state: int | None = None
    """(mamba2) N: state size; None = the largest of 128/64/32/16 that meets the budget (2%)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into saved adapters (never read by the model)."""

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("window", "chunk"):
            value = getattr(self, name)
            need(_is_int(value) and 0 < value <= MAX_TOKENS,
                 f"{name} must be a positive integer <= {MAX_TOKENS} (2**22 tokens), got {value!r}")
        need(_is_int(self.sinks) and 0 <= self.sinks <= MAX_TOKENS,
             f"sinks must be an integer >= 0 and <= {MAX_TOKENS} (2**22 tokens), got {self.sinks!r}")
        need(self.positions in POSITION_MODES, f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        need(self.init in INIT_MODES, f"init must be one of {INIT_MODES}, got {self.init!r}")
        need(self.memory_type in MEMORY_TYPES,
             f"memory_type must be one of {MEMORY_TYPES} ('ttt' = the AllMem memory, 'mamba2' = the Mamba-2 "
             f"baseline), got {self.memory_type!r}")
        for name in ("mamba_heads", "mamba_head_dim", "mamba_state"):
            value = getattr(self, name)
            need(value is None or (_is_int(value) and 0 < value <= MAX_WIDTH),
                 f"{name} must be None or a positive integer <= {MAX_WIDTH}, got {value!r}")
        need(self.inner_loss in INNER_LOSSES, f"inner_loss must be one of {INNER_LOSSES}, got {self.inner_loss!r}")
        for name in ("memory_heads", "memory_head_dim"):
            value = getattr(self, name)
            need(value is None or (_is_int(value) and 0 < value <= MAX_WIDTH),
                 f"{name} must be None or a positive integer <= {MAX_WIDTH}, got {value!r}")
        need(_is_int(self.expansion) and 1 <= self.expansion <= MAX_WIDTH,
             f"expansion must be an integer >= 1 and <= {MAX_WIDTH}, got {self.expansion!r}")
        need(_is_int(self.conv_kernel) and 0 <= self.conv_kernel <= MAX_WIDTH,
             f"conv_kernel must be an integer >= 0 and <= {MAX_WIDTH}, got {self.conv_kernel!r}")
        need(self.conv_init in CONV_INITS, f"conv_init must be one of {CONV_INITS}, got {self.conv_init!r}")
        need(self.key_init in KEY_INITS, f"key_init must be one of {KEY_INITS}, got {self.key_init!r}")
        need(self.output_init in OUTPUT_INITS, f"output_init must be one of {OUTPUT_INITS}, got {self.output_init!r}")
        need(self.output_init == "random" or self.init == "attention",
             "output_init='attention' copies the attention's o_proj into a memory as wide as its values; "
             "it needs init='attention'")
        need(_is_number(self.base_lr) and self.base_lr > 0, f"base_lr must be a positive number, got {self.base_lr!r}")
        need(_is_number(self.momentum_init) and 0.0 < self.momentum_init < 1.0,
             f"momentum_init must lie strictly between 0 and 1, got {self.momentum_init!r}")
        need(self.clip is None or (_is_number(self.clip) and self.clip > 0),
             f"clip must be None or a number > 0, got {self.clip!r}")
        need(_is_number(self.norm_eps) and self.norm_eps > 0, f"norm_eps must be a number > 0, got {self.norm_eps!r}")
        need(isinstance(self.read_residual, bool), f"read_residual must be True or False, got {self.read_residual!r}")
        need(isinstance(self.weight_norm, bool), f"weight_norm must be True or False, got {self.weight_norm!r}")
        need(isinstance(self.centre, bool), f"centre must be True or False, got {self.centre!r}")
        need(not self.centre or self.memory_type == "ttt", "centre=True is for the TTT memory (memory_type='ttt')")
        need(self.weight_norm or self.clip is not None,
             "weight_norm=False needs clip (a number): without both the fast weights can grow without bound "
             "and the memory returns NaN")
        need(_is_number(self.qk_scale) and self.qk_scale > 0,
             f"qk_scale must be a positive number, got {self.qk_scale!r}")
        need(self.swa_block is None or (_is_int(self.swa_block) and 0 < self.swa_block <= MAX_TOKENS),
             f"swa_block must be None or a positive integer <= {MAX_TOKENS}, got {self.swa_block!r}")
        need(isinstance(self.extra, dict), f"extra must be a mapping, got {type(self.extra).__name__}")
        if self.chunk > self.window:
            warnings.warn(
                f"chunk ({self.chunk}) > window ({self.window}): a token older than the window but inside "
                "the current chunk is seen by neither the window nor the memory; prefer chunk <= window",
                stacklevel=3,
            )

    def replace(self, **changes: Any) -> "AllMemConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AllMemConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown AllMemConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
