"""Multi-query associative recall (MQAR) probe of the memories, trained from scratch on CPU.

MQAR (Zoology: Arora et al. 2023, HazyResearch/zoology ``multiquery_ar``): a sequence opens
with key/value pairs ``k1 v1 k2 v2 ...``; later, among filler tokens, some keys appear again
and the model must predict each one's value as the next token. Our twist, ``min_gap``: every
query lies at least ``min_gap`` tokens after the end of the pairs, so with ``min_gap`` = the
window the answer is always older than the sliding window: SWA alone must fail, and whatever
the model gets right beyond chance comes from the memory.

Every mixer shares one backbone, a randomly initialised 2-layer ``LlamaForCausalLM`` built
from a config (no download), and trains from scratch with AdamW on fresh batches until the
accuracy on held-out examples reaches ``target_acc`` or the step / time budget runs out:

    full    the Llama itself (full attention): the ceiling
    swa     allmem.convert(window=W) with the memory off (alpha = 0, memory frozen): the floor
    allmem  allmem.convert(memory_type="ttt"): SWA + the test-time-trained memory
    mamba2  allmem.convert(memory_type="mamba2"): SWA + Mamba-2 with the TTT memory's state size

Recurrent state per layer (floats): TTT heads * 3 * d_h * (e * d_h) (three fast-weight
matrices; the momentum doubles it in the cache but holds no new content), Mamba-2 heads * P * N.

Entry points: ``multiquery_ar`` (data), ``build_model``, ``train_point`` (one mixer at one
(seq_len, pairs) point), ``run_grid`` (resumable, writes mqar.json / .md / .png) and
``run_sweep`` (the AllMem memory under several settings: sweep.json / .md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MIXERS = ("full", "swa", "allmem", "mamba2")
TRAIN_KEYS = ("lr", "batch", "alpha_init", "warmup", "weight_decay", "vocab", "tie_embeddings", "queries",
              "key_free_filler", "mixture")
"""``--set`` keys that belong to the training run; every other key is an AllMemConfig field."""


class MQARError(ValueError):
    """Bad probe input (grid point, setting, mixer); the CLI prints it as one error line."""


# ----------------------------------------------------------------------------- data
def multiquery_ar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    *,
    vocab_size: int = 8192,
    min_gap: int = 64,
    num_queries: int | None = None,
    key_free_filler: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples as in Zoology's ``multiquery_ar``, with queries kept ``min_gap`` away.

    Layout of one example (P = num_kv_pairs, context = 2P tokens):

        [k1 v1 k2 v2 ... kP vP | filler ... kq ... kq' ... filler]
                               ^ context end        queries at positions >= 2P + min_gap

    Keys are drawn without replacement from [1, vocab/2), values from [vocab/2, vocab) (one
    value per key, distinct within an example). The queries are ``num_queries`` (default P)
    keys of the example in random order, every key once when ``num_queries`` <= P (distinct
    keys), each key at least once and the rest drawn again at random when larger; they sit at
    distinct even offsets 2P + min_gap + 2j (so no two queries touch). Every other token after
    the context is uniform filler from the whole vocabulary, as in Zoology's
    ``random_non_queries``, except that with ``key_free_filler`` (default) a filler token equal
    to one of the example's keys is replaced by a random value token: with Zoology's vocabulary
    of 8192 such a clash is rare, with 128 each key would recur about once as filler, followed
    by a random token, a decoy that an induction head cannot tell from the real pair.

    Returns:
        inputs [N, L] int64 token ids;
        labels [N, L] int64: at a query position the value paired with the queried key (the
        next-token target), -100 everywhere else, so loss and accuracy see answers only.
    """
    num_queries = num_kv_pairs if num_queries is None else num_queries
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    slots = (seq_len - context - min_gap + 1) // 2  # even offsets from context + min_gap
    if num_kv_pairs < 1 or num_queries < 1 or min_gap < 0:
        raise MQARError(f"need num_kv_pairs >= 1, num_queries >= 1, min_gap >= 0; got {num_kv_pairs}, "
                        f"{num_queries}, {min_gap}")
    if half - 1 < num_kv_pairs:
        raise MQARError(f"vocab_size {vocab_size} has too few keys for {num_kv_pairs} distinct pairs")
    if slots < num_queries:
        raise MQARError(
            f"seq_len {seq_len} is too short for {num_kv_pairs} pairs ({context} tokens), a gap of {min_gap} "
            f"and {num_queries} queries on even offsets; need seq_len >= {context + min_gap + 2 * num_queries - 1}"
        )
    g = torch.Generator().manual_seed(seed)
    n = num_examples
    # distinct keys and values per row: the first P of a random permutation (argsort of noise)
    keys = torch.rand(n, half - 1, generator=g).argsort(1)[:, :num_kv_pairs] + 1  # [N, P] in [1, half)
    values = torch.rand(n, vocab_size - half, generator=g).argsort(1)[:, :num_kv_pairs] + half  # [N, P]
    kvs = torch.stack([keys, values], dim=2).flatten(1)  # [N, 2P]: k1 v1 k2 v2 ...

    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    if key_free_filler:  # a filler token equal to one of the example's keys becomes a random value token
        clash = (inputs[:, :, None] == keys[:, None, :]).any(-1)
        inputs = torch.where(clash, torch.randint(half, vocab_size, (n, seq_len), generator=g), inputs)
    inputs[:, :context] = kvs
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    # every key once in random order (the first min(Q, P) of a permutation); past P, keys again at random
    asked = torch.rand(n, num_kv_pairs, generator=g).argsort(1)[:, :num_queries]  # [N, min(Q, P)] pair indices
    if num_queries > num_kv_pairs:
        again = torch.randint(0, num_kv_pairs, (n, num_queries - num_kv_pairs), generator=g)
        asked = torch.cat([asked, again], 1).gather(1, torch.rand(n, num_queries, generator=g).argsort(1))
    where = torch.rand(n, slots, generator=g).argsort(1)[:, :num_queries]  # [N, Q] slot indices
    pos = context + min_gap + 2 * where  # [N, Q] query positions
    inputs.scatter_(1, pos, keys.gather(1, asked))
    labels.scatter_(1, pos, values.gather(1, asked))
    return inputs, labels


# ---------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ProbeConfig:
    """One training run of the probe: backbone, window/chunk, optimiser and budget."""

    d_model: int = 128
    layers: int = 2
    head_dim: int = 64
    intermediate: int = 256
    vocab: int = 128
    """64 keys, 64 values (value chance 1.6 %). Zoology uses 8192, out of reach of a CPU budget."""
    tie_embeddings: bool = True
    """LM head = the token embedding (as in Zoology's models)."""
    window: int = 64
    sinks: int = 0
    chunk: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch: int = 16
    warmup: int = 50
    steps: int = 3000
    budget_s: float = 300.0
    alpha_init: float = 1.0
    """alpha of the allmem / mamba2 mixers at the start (the spec's 0 suits a pretrained base)."""
    eval_examples: int = 256
    eval_every: int = 50
    target_acc: float = 0.99
    """stop early once the held-out accuracy reaches this."""
    seed: int = 0
    key_free_filler: bool = True
    """filler never repeats one of the example's keys (see ``multiquery_ar``)."""
    queries: int | None = None
    """queries per training example: None = one per pair (Zoology), 0 = every free slot, keys asked again
    at random (more answers per step, more signal); held-out examples always ask each key once."""
    mixture: bool = False
    """train on a Zoology-style mixture of lengths: step i draws its batch from the i-th of (L, P), (L/2, P/2),
    (L/4, P/4), ... (the points whose layout fits the window), so what the model learns on short sequences
    carries to the long ones; the held-out examples stay at (L, P). See ``training_points``."""
    memory: dict[str, Any] = field(default_factory=dict)
    """AllMemConfig overrides (base_lr, expansion, inner_loss, clip, conv_kernel, ...)."""

    def settings(self) -> dict[str, Any]:
        """What identifies a result besides (mixer, point): everything but the budget knobs."""
        d = dataclasses.asdict(self)
        for k in ("steps", "budget_s", "eval_every", "target_acc"):
            d.pop(k)
        return d


def _base_model(cfg: ProbeConfig, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = cfg.d_model // cfg.head_dim
    if heads < 1 or heads * cfg.head_dim != cfg.d_model:
        raise MQARError(f"d_model {cfg.d_model} must be a multiple of head_dim {cfg.head_dim}")
    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=cfg.head_dim, max_position_embeddings=max(seq_len, 2048), tie_word_embeddings=cfg.tie_embeddings,
    )
    return LlamaForCausalLM(config)


def ttt_state_size(heads: int, head_dim: int, expansion: int) -> int:
    """Floats of fast weights per layer: W1, W3 [e d_h, d_h] and W2 [d_h, e d_h] per head."""
    return heads * 3 * head_dim * expansion * head_dim


def mamba2_dims_for_state(state: int, head_dim: int) -> tuple[int, int]:
    """(heads, N) with heads * head_dim * N = ``state``, the largest N of 128/64/32/16."""
    for n in (128, 64, 32, 16):
        if state % (head_dim * n) == 0:
            return state // (head_dim * n), n
    raise MQARError(f"no Mamba-2 (heads, N) with head_dim {head_dim} holds exactly {state} floats")


def allmem_config(cfg: ProbeConfig, mixer: str):
    """The AllMemConfig of an ``swa`` / ``allmem`` / ``mamba2`` mixer (memory overrides applied)."""
    from ..config import AllMemConfig, ConfigError

    base = dict(window=cfg.window, sinks=cfg.sinks, chunk=cfg.chunk, init="random")
    try:
        config = AllMemConfig.from_dict({**base, **cfg.memory})
    except (ConfigError, TypeError) as exc:
        raise MQARError(f"bad memory setting: {exc}") from None
    if mixer == "mamba2":
        heads = config.memory_heads or cfg.d_model // cfg.head_dim
        head_dim = config.memory_head_dim or cfg.head_dim
        m_heads, m_state = mamba2_dims_for_state(ttt_state_size(heads, head_dim, config.expansion), head_dim)
        config = config.replace(memory_type="mamba2", mamba_heads=m_heads, mamba_head_dim=head_dim, mamba_state=m_state)
    return config


def build_model(mixer: str, cfg: ProbeConfig, seq_len: int) -> torch.nn.Module:
    """A freshly initialised model of ``mixer`` (seeded by ``cfg.seed``); every parameter
    trains except the swa floor's memory and alpha."""
    import warnings

    from ..convert import convert

    if mixer not in MIXERS:
        raise MQARError(f"unknown mixer {mixer!r}; choose from {MIXERS}")
    torch.manual_seed(cfg.seed)
    base = _base_model(cfg, seq_len)
    if mixer == "full":
        return base.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunk > window is the user's explicit choice here
        model = convert(base, allmem_config(cfg, mixer), base_name="mqar-llama").train()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.alpha.fill_(0.0 if mixer == "swa" else cfg.alpha_init)
    if mixer == "swa":
        for p in model.memory_parameters().values():
            p.requires_grad_(False)
    return model


def recurrent_state_floats(model: torch.nn.Module) -> int | None:
    """Floats of recurrent memory state per layer (None for the full / swa mixers)."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    if not layers or not hasattr(layers[0].self_attn, "memory"):
        return None
    mem = layers[0].self_attn.memory
    if hasattr(mem, "state_size"):  # Mamba-2: [H, P, N]
        return mem.heads * mem.head_dim * mem.state_size
    return sum(w.numel() for w in mem.initial_weights())


def answer_logits(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [n_answers, vocab] at the positions ``mask`` [B, L] marks (the LM head runs
    only there: the full vocab at every position would dominate the cost)."""
    if hasattr(model, "allmem_config"):
        hidden = model(inputs, use_cache=False, return_hidden=True).hidden_states
    else:
        hidden = model.model(inputs, use_cache=False).last_hidden_state
    return model.lm_head(hidden[mask])


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """(accuracy, loss) over the answer positions: exact match of the argmax, mean cross-entropy."""
    was_training = model.training
    model.eval()
    correct, loss, count = 0, 0.0, 0
    for i in range(0, len(inputs), batch):
        x, y = inputs[i : i + batch], labels[i : i + batch]
        mask = y != -100
        logits = answer_logits(model, x, mask).float()
        target = y[mask]
        correct += int((logits.argmax(-1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        count += int(target.numel())
    model.train(was_training)
    return correct / max(count, 1), loss / max(count, 1)


def num_queries(seq_len: int, num_kv_pairs: int, cfg: ProbeConfig) -> int:
    """Queries per training example under ``cfg.queries`` (0 = every free even slot)."""
    if cfg.queries is None:
        return num_kv_pairs
    if cfg.queries == 0:
        return max(num_kv_pairs, (seq_len - 2 * num_kv_pairs - cfg.window + 1) // 2)
    return cfg.queries


def training_points(seq_len: int, num_kv_pairs: int, cfg: ProbeConfig) -> list[tuple[int, int]]:
    """The (seq_len, pairs) points the training batches cycle through: the point itself, and with
    ``cfg.mixture`` its halvings while both numbers halve exactly and the layout still fits
    (queries ``cfg.window`` tokens after the pairs)."""
    points = [(seq_len, num_kv_pairs)]
    length, pairs = seq_len, num_kv_pairs
    while cfg.mixture and length % 2 == 0 and pairs % 2 == 0:
        length, pairs = length // 2, pairs // 2
        if length < 2 * pairs + cfg.window + 2 * num_queries(length, pairs, cfg) - 1:
            break
        points.append((length, pairs))
    return points


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10 % by progress = 1."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_point(
    mixer: str,
    seq_len: int,
    num_kv_pairs: int,
    cfg: ProbeConfig,
    *,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, Any]:
    """Train ``mixer`` from scratch on MQAR at one point; evaluate on held-out examples.

    Progress = max(step / steps, elapsed / budget_s) drives the cosine schedule, so the decay
    ends whichever budget runs out first. Returns a JSON-ready record."""
    from tqdm.auto import tqdm

    data = dict(vocab_size=cfg.vocab, min_gap=cfg.window, key_free_filler=cfg.key_free_filler)
    multiquery_ar(1, seq_len, num_kv_pairs, **data)  # validate the point before building anything
    points = [(length, pairs, num_queries(length, pairs, cfg))
              for length, pairs in training_points(seq_len, num_kv_pairs, cfg)]
    model = build_model(mixer, cfg, seq_len)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # weight decay on matrices only: not on norms, biases, convs or the memory's initial fast weights
    decay = [p for n, p in named if p.dim() == 2 and "conv" not in n]
    no_decay = [p for n, p in named if not (p.dim() == 2 and "conv" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    eval_x, eval_y = multiquery_ar(cfg.eval_examples, seq_len, num_kv_pairs, seed=10**6 + cfg.seed, **data)
    quick = min(128, cfg.eval_examples)
    bar = tqdm(total=cfg.steps, desc=desc or f"{mixer} {seq_len}:{num_kv_pairs}", disable=not progress,
               dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    history, acc, step, loss_value, best = [], 0.0, 0, float("nan"), 0.0
    while step < cfg.steps:
        elapsed = time.perf_counter() - start
        if elapsed >= cfg.budget_s:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, max(step / cfg.steps, elapsed / cfg.budget_s), cfg.warmup)
        length, pairs, queries = points[step % len(points)]
        x, y = multiquery_ar(cfg.batch, length, pairs, num_queries=queries, seed=cfg.seed * 10**7 + step, **data)
        mask = y != -100
        loss = F.cross_entropy(answer_logits(model, x, mask).float(), y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        loss_value = float(loss.detach())
        if step % cfg.eval_every == 0:
            acc, _ = evaluate(model, eval_x[:quick], eval_y[:quick])
            best = max(best, acc)
            history.append([step, round(time.perf_counter() - start, 1), round(loss_value, 4), round(acc, 4)])
            if acc >= cfg.target_acc:
                bar.update(1)
                break
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.3f}")
    train_s = time.perf_counter() - start
    bar.close()
    accuracy, eval_loss = evaluate(model, eval_x, eval_y)
    return {
        "mixer": mixer, "seq_len": seq_len, "pairs": num_kv_pairs, "settings": cfg.settings(),
        "accuracy": accuracy, "loss": eval_loss, "train_loss": loss_value, "steps": step,
        "train_s": round(train_s, 1), "s_per_step": round(train_s / max(step, 1), 3),
        "state_floats_per_layer": recurrent_state_floats(model) if mixer in ("allmem", "mamba2") else None,
        "params": sum(p.numel() for p in model.parameters()), "history": history,
    }


# ------------------------------------------------------------------------ settings
def parse_value(text: str) -> Any:
    """'none' -> None, 'true'/'false' -> bool, then int, float, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """['base_lr=0.3', 'clip=none'] -> {'base_lr': 0.3, 'clip': None}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MQARError(f"a setting must look like key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def with_settings(cfg: ProbeConfig, settings: dict[str, Any]) -> ProbeConfig:
    """``cfg`` with training keys (TRAIN_KEYS) replaced and the rest merged into ``memory``;
    the memory part is validated against AllMemConfig here."""
    train = {k: v for k, v in settings.items() if k in TRAIN_KEYS}
    memory = {**cfg.memory, **{k: v for k, v in settings.items() if k not in TRAIN_KEYS}}
    out = dataclasses.replace(cfg, **train, memory=memory)
    allmem_config(out, "allmem")
    return out


def parse_grid(items: Sequence[str]) -> list[tuple[int, int]]:
    """['256:16', '512:32'] -> [(256, 16), (512, 32)]."""
    points = []
    for item in items:
        try:
            length, pairs = (int(t) for t in item.split(":"))
        except ValueError:
            raise MQARError(f"a grid point must look like SEQ_LEN:PAIRS (e.g. 256:16), got {item!r}") from None
        if length < 1 or pairs < 1:
            raise MQARError(f"grid point {item!r}: both numbers must be positive")
        points.append((length, pairs))
    return points


# --------------------------------------------------------------------- grid & sweep
def _same(record: dict, mixer: str, point: tuple[int, int], settings: dict) -> bool:
    return (record["mixer"], record["seq_len"], record["pairs"]) == (mixer, *point) and record["settings"] == settings


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"] if path.exists() else []


def _save(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": records}, indent=1) + "\n")


def _run_all(jobs: list[tuple[str, tuple[int, int], ProbeConfig, str]], path: Path, progress: bool,
             log: Callable[[str], None]) -> list[dict]:
    """Run (mixer, point, cfg, label) jobs, skipping those already in ``path``; saves after each."""
    for point in {job[1] for job in jobs}:
        multiquery_ar(1, *point, vocab_size=jobs[0][2].vocab, min_gap=jobs[0][2].window)  # fail early
    records = _load(path)
    chosen = []
    for mixer, point, cfg, label in jobs:
        settings = json.loads(json.dumps(cfg.settings()))  # as it reads back from JSON
        found = next((r for r in records if _same(r, mixer, point, settings)), None)
        if found is None:
            found = train_point(mixer, *point, cfg, progress=progress, desc=f"{label} {point[0]}:{point[1]}")
            found["settings"] = settings
            records.append(found)
            _save(path, records)
            log(f"{label} {point[0]}:{point[1]}: acc {found['accuracy']:.3f} loss {found['loss']:.3f} "
                f"({found['steps']} steps, {found['train_s']:.0f} s)")
        chosen.append({**found, "label": label})
    return chosen


def _table(rows: dict[str, dict[str, float]], columns: list[str], row_label: str, fmt: str = "{:.1f}") -> str:
    lines = [f"| {row_label} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(cells[c]) if c in cells else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _describe(cfg: ProbeConfig) -> str:
    return (f"d_model {cfg.d_model}, {cfg.layers} layers, head_dim {cfg.head_dim}, vocab {cfg.vocab}, window {cfg.window} "
            f"(queries >= {cfg.window} tokens after the pairs), sinks {cfg.sinks}, chunk {cfg.chunk}, lr {cfg.lr}, "
            f"batch {cfg.batch}, alpha_init {cfg.alpha_init}, <= {cfg.steps} steps / {cfg.budget_s:.0f} s per point, "
            f"memory {cfg.memory or 'defaults'}, seed {cfg.seed}, "
            f"filler {'key-free' if cfg.key_free_filler else 'whole vocab'}, "
            f"training queries {'one per pair' if cfg.queries is None else cfg.queries or 'every free slot'}"
            + (", trained on a mixture of lengths (L, L/2, ...)" if cfg.mixture else ""))


def run_grid(mixers: Sequence[str], grid: Sequence[tuple[int, int]], cfg: ProbeConfig, out: str | Path, *,
             progress: bool = True, plot: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Every mixer at every grid point; writes OUT/mqar.json (all results ever run there),
    OUT/mqar.md (accuracy %, rows = mixers, columns = points) and OUT/mqar.png."""
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise MQARError(f"unknown mixers {unknown}; choose from {list(MIXERS)}")
    with_settings(cfg, {})
    out = Path(out)
    jobs = [(m, p, cfg, m) for p in grid for m in mixers]
    chosen = _run_all(jobs, out / "mqar.json", progress, log)
    columns = [f"{length}:{pairs}" for length, pairs in grid]
    acc = {m: {} for m in mixers}
    loss = {m: {} for m in mixers}
    steps = {m: {} for m in mixers}
    for r in chosen:
        column = f"{r['seq_len']}:{r['pairs']}"
        acc[r["mixer"]][column] = 100 * r["accuracy"]
        loss[r["mixer"]][column] = r["loss"]
        steps[r["mixer"]][column] = r["steps"]
    states = {r["mixer"]: r["state_floats_per_layer"] for r in chosen if r["mixer"] in ("allmem", "mamba2")}
    text = (f"# MQAR accuracy (%) on held-out examples, columns seq_len:pairs\n\n{_describe(cfg)}\n\n"
            + _table(acc, columns, "mixer") + "\nHeld-out loss (answer positions):\n\n"
            + _table(loss, columns, "mixer", "{:.3f}")
            + "\nTraining steps run (the budget is wall time; a result keeps the budget it ran with):\n\n"
            + _table(steps, columns, "mixer", "{:d}")
            + f"\nRecurrent state per layer (floats): {states}\n")
    (out / "mqar.md").write_text(text)
    if plot:
        _plot(acc, grid, out / "mqar.png", _describe(cfg))
        plot_curves(chosen, out / "mqar_curves.png", _describe(cfg))
    return chosen


def plot_curves(records: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Held-out accuracy (the quick eval every ``eval_every`` steps) against training step, one
    line per record: does a run rise steadily, sit on a plateau, or jump?"""
    fig, ax = _accuracy_axes()
    for r in records:
        if r.get("history"):
            steps, accs = zip(*[(h[0], 100 * h[3]) for h in r["history"]])
            ax.plot(steps, accs, label=f"{r.get('label', r['mixer'])} {r['seq_len']}:{r['pairs']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out MQAR accuracy (%)")
    ax.set_title("MQAR training curves", fontsize=10)
    _save_figure(fig, ax, path, title, legend_size=7)


def _accuracy_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.set_ylim(-2, 102)
    return fig, ax


def _save_figure(fig, ax, path: str | Path, title: str, legend_size: int | None = None) -> None:
    """The run's settings in small print under the axes, grid, legend; write and close."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.01, title, fontsize=5, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(acc: dict[str, dict[str, float]], grid: Sequence[tuple[int, int]], path: Path, title: str) -> None:
    fig, ax = _accuracy_axes()
    for mixer, cells in acc.items():
        xs = [length for length, pairs in grid if f"{length}:{pairs}" in cells]
        ys = [cells[f"{length}:{pairs}"] for length, pairs in grid if f"{length}:{pairs}" in cells]
        ax.plot(xs, ys, marker="o", label=mixer)
    ax.set_xscale("log", base=2)
    ax.set_xticks([length for length, _ in grid], [f"{length}\n({pairs} pairs)" for length, pairs in grid])
    ax.set_xlabel("sequence length (key/value pairs)")
    ax.set_ylabel("MQAR accuracy (%)")
    ax.set_title("MQAR, queries beyond the window", fontsize=10)
    _save_figure(fig, ax, path, title)


def run_sweep(variants: Sequence[str], grid: Sequence[tuple[int, int]], cfg: ProbeConfig, out: str | Path, *,
              mixer: str = "allmem", progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """``mixer`` under each variant (comma-separated key=value overrides on top of ``cfg``,
    '' or 'default' = cfg itself) at each point; writes OUT/sweep.json and OUT/sweep.md."""
    out = Path(out)
    jobs = []
    for variant in variants:
        items = [] if variant.strip() in ("", "default") else [s for s in variant.split(",") if s.strip()]
        run_cfg = with_settings(cfg, parse_settings(items))
        jobs += [(mixer, p, run_cfg, variant or "default") for p in grid]
    chosen = _run_all(jobs, out / "sweep.json", progress, log)
    columns = [f"{length}:{pairs}" for length, pairs in grid]
    rows: dict[str, dict[str, str]] = {}
    for r in chosen:  # one cell per point: accuracy %, held-out loss, steps run
        rows.setdefault(r["label"], {})[f"{r['seq_len']}:{r['pairs']}"] = \
            f"{100 * r['accuracy']:.1f} / {r['loss']:.3f} / {r['steps']}"
    text = (f"# MQAR sweep of the {mixer} mixer: accuracy (%) / held-out loss / steps, columns seq_len:pairs\n\n"
            f"base: {_describe(cfg)}\n\n" + _table(rows, columns, "setting", "{}"))
    (out / "sweep.md").write_text(text)
    return chosen
