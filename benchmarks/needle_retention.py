"""How long does SmolLM2's fresh memory keep a fact? The write side of recall, on real activations.

benchmarks/memory_addressing.py asks whether a query finds the needle's key. This asks whether the
value is still there to find: for held-out passkey prompts, the memory inputs of a fresh conversion
are captured twice, once as they are and once with every needle digit d replaced by (d + 5) % 10.
Both are run through the memory op under each write setting below, and at probe positions every 64
tokens after the needle the read is taken with the needle's own key (an oracle query: addressing
is perfect by construction). Retention at age a = cosine between how that read changes and how the
needle's value changes: 1 = the read still moves exactly with the fact, 0 = the fact is gone.
Averaged over the chosen layers, their heads and the prompts. No training, no model output: this
isolates the write/forget dynamics of the fast weights on the activations a real model gives them.

    .venv/bin/python benchmarks/needle_retention.py [--prompts 3] [--out docs/distill/recall/retention]

Settings: eta is the inner learning rate of every token ("uniform") or of the needle's tokens with
the filler's scaled down ("selective xF": what a trained write gate could do); "centred" subtracts the
prompt's mean key (from queries and keys) and mean value before the norms (a static centring, ours).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from memory_addressing import RECALL_SETTINGS, features, passkey_pair  # the same prompts and features

SETTINGS = {  # name -> (filler eta factor, centred, clip, weight norm)
    "uniform eta 0.1 (the recipe)": (1.0, False, 1.0, True),
    "uniform, no clip": (1.0, False, None, True),
    "uniform, no weight norm": (1.0, False, 1.0, False),
    "uniform, centred": (1.0, True, 1.0, True),
    "selective x0.1": (0.1, False, 1.0, True),
    "selective x0.01": (0.01, False, 1.0, True),
    "selective x0.1, centred": (0.1, True, 1.0, True),
    "selective x0.01, centred": (0.01, True, 1.0, True),
}
PROBE_EVERY = 64


def capture(model, tok, prompts: int, length: int) -> list[dict]:
    """Per prompt: the memory inputs [1, T, d] of every layer for the prompt and its counterfactual."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.memory.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    rng, records = random.Random(7), []
    for _ in range(prompts):
        prompt, answer, needle, counter = passkey_pair(tok, length, rng)
        record = {"needle": needle, "needle_len": len(answer), "prompt_len": len(prompt)}
        with torch.no_grad():
            for name, ids in (("fact", prompt), ("counter", counter)):
                model(torch.tensor([ids]), use_cache=False)
                record[name] = dict(inputs)
        records.append(record)
    for hook in hooks:
        hook.remove()
    return records


def retention(memory, record: dict, layer: int, filler: float, centred: bool, clip, weight_norm: bool, base_lr: float,
              momentum: float, chunk: int) -> dict[int, float]:
    """{age: mean over heads of cos(change of the oracle read, change of the needle's value)}."""
    from allmem.ops.ttt import FastWeights, TTTState, chunk_ttt, row_norms

    needle, prompt_len = record["needle"], record["prompt_len"]
    heads = lambda t: memory._split(t).transpose(0, 1)  # noqa: E731  [T, H d] -> [H, T, d]
    q_mean = k_mean = v_mean = 0.0
    if centred:  # the fact's prompt means, the same shift for both runs
        with torch.no_grad():
            _, k_fact, v_fact = (f[0] for f in features(memory, record["fact"][layer]))
        k_mean, v_mean = k_fact.mean(0), v_fact.mean(0)
        q_mean = k_mean
    ages = list(range(40, prompt_len - needle, PROBE_EVERY))
    probes = [needle + a for a in ages]
    reads, values, oracle = {}, {}, None
    for name in ("fact", "counter"):
        with torch.no_grad():
            q, k, v = (f[0] for f in features(memory, record[name][layer]))
            q = F.normalize(heads(memory.q_norm(q - q_mean)), dim=-1)
            k = F.normalize(heads(memory.k_norm(k - k_mean)), dim=-1)
        v = heads(v - v_mean)
        if oracle is None:
            oracle = k[:, needle + 1].clone()  # the key of the needle's second digit, from the fact's run
        q[:, probes] = oracle[:, None]
        length = q.shape[1]
        eta = torch.full((memory.heads, length), base_lr * filler)
        eta[:, needle:needle + record["needle_len"]] = base_lr
        w0 = FastWeights(*(w.detach() for w in memory.initial_weights()))
        zeros = FastWeights(*(torch.zeros_like(w) for w in w0))
        beta = torch.full((memory.heads, -(-length // chunk)), momentum)
        with torch.no_grad():
            o, _ = chunk_ttt(q, k, v, eta, beta, TTTState(w0, zeros), row_norms(w0) if weight_norm else None,
                             chunk_size=chunk, clip=clip, residual=False)
        reads[name], values[name] = o, v
    read_change = reads["fact"] - reads["counter"]
    value_change = values["fact"][:, needle + 1] - values["counter"][:, needle + 1]
    return {age: float(F.cosine_similarity(read_change[:, p], value_change, dim=-1).nan_to_num(0.0).mean())
            for age, p in zip(ages, probes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6, 10, 14, 18, 22, 26])
    parser.add_argument("--out", default=None, help="also write retention.md to this folder")
    args = parser.parse_args()

    from allmem import convert, load_base
    from allmem.distill.recipe import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe("smollm2-recall", [*RECALL_SETTINGS, "allmem.key_init=query"])
    config = recipe.allmem_config()
    base, tok = load_base(recipe.base, dtype=torch.float32)
    model = convert(base, config, base_name=recipe.base).eval()
    records = capture(model, tok, args.prompts, args.length)
    shown_ages = [40, 104, 232, 360, 488]
    lines = ["# Needle retention in SmolLM2's fresh memory (benchmarks/needle_retention.py)", "",
             f"cos(change of the read with the needle's own key, change of the needle's value) at each age (tokens "
             f"after the needle), mean over layers {args.layers} x {model.model.layers[0].self_attn.memory.heads} heads x "
             f"{args.prompts} held-out passkey prompts of {args.length} tokens. Memory: read_residual false, "
             f"base_lr {config.base_lr}, momentum {config.momentum_init}, chunk {config.chunk}, key_init query.", "",
             "| write setting | " + " | ".join(f"age {a}" for a in shown_ages) + " |", "|---" * (1 + len(shown_ages)) + "|"]
    for name, (filler, centred, clip, weight_norm) in SETTINGS.items():
        per_age: dict[int, list[float]] = {}
        for record in records:
            for layer in args.layers:
                memory = model.model.layers[layer].self_attn.memory
                for age, value in retention(memory, record, layer, filler, centred, clip, weight_norm, config.base_lr,
                                            config.momentum_init, config.chunk).items():
                    per_age.setdefault(age, []).append(value)
        cells = [f"{sum(per_age[a]) / len(per_age[a]):.2f}" if per_age.get(a) else "-" for a in shown_ages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "needle_retention.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
