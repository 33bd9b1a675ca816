"""Would a selective write gate alone make SmolLM2's fresh memory recall? The whole model, no training.

benchmarks/needle_retention.py shows that the fast weights keep a passkey for 500 tokens only if the
filler writes far less than the needle. This asks the question that decides what to train: with such a
gate given by an oracle (eta = base_lr on the needle's digits, base_lr x F on every other token), does
the fresh conversion (keys = queries with key_shift, the memory's output in the attention's output space)
put the right code ahead of a wrong one at the answer, and how much of the memory's output (alpha, one
value for every channel of every layer) does that need? The recall margin (allmem.eval.recall) is
log p(right code) - log p(wrong code of the same form), summed over the answer, on held-out passkey
prompts whose needle lies far outside the window; SWA + sinks (alpha = 0) is the floor.

    .venv/bin/python benchmarks/oracle_gate.py [--alphas 0.25 0.5 1] [--fillers 1 0.01] [--set centre=true]
    .venv/bin/python benchmarks/oracle_gate.py --weights RUN/checkpoints/step-N/trainable.safetensors --set centre=true \
        --fillers learned      # a trained checkpoint's own gates, its own alpha and the alphas given
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from memory_addressing import RECALL_SETTINGS, passkey_pair, recall_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--fillers", nargs="+", default=["1", "0.1", "0.01"],
                        help="eta on every token but the needle's digits, as a factor of base_lr; 'learned' "
                             "keeps the model's own write gates")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more memory settings (allmem.KEY)")
    parser.add_argument("--weights", default=None, help="a checkpoint's trainable.safetensors (its own gates and alpha come first, then the rows asked)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    try:
        fillers = [None if f == "learned" else float(f) for f in args.fillers]
    except ValueError:
        parser.error(f"--fillers takes numbers or 'learned', got {args.fillers}")

    from allmem.eval.recall import answer_logprob

    torch.set_num_threads(1)
    settings = [*RECALL_SETTINGS, "allmem.key_init=query", "allmem.output_init=attention", *(f"allmem.{s}" for s in args.set)]
    model, tok, config = recall_model(settings, args.weights, args.length)

    gate: dict[str, object] = {"needle": None, "filler": 1.0}

    def override_eta(module, inputs, out):
        """eta_proj's logits such that softplus gives base_lr on the needle and base_lr x filler elsewhere."""
        if gate["needle"] is None or gate["filler"] is None:
            return out
        start, stop = gate["needle"]
        target = torch.full(out.shape[:-1], config.base_lr * gate["filler"], dtype=out.dtype)
        target[:, start:stop] = config.base_lr
        logits = target + torch.log(-torch.expm1(-target))  # inverse softplus
        return logits.unsqueeze(-1).expand_as(out)

    for layer in model.model.layers:
        layer.self_attn.memory.eta_proj.register_forward_hook(override_eta)

    rng, items = random.Random(7), []
    for _ in range(args.prompts):
        prompt, answer, needle, counter = passkey_pair(tok, args.length, rng)
        wrong = counter[needle:needle + len(answer)]  # every digit d -> (d + 5) % 10
        items.append((prompt, answer, wrong, needle))
    logits_fn = lambda ids, keep: model(ids, use_cache=False, logits_to_keep=keep).logits  # noqa: E731

    def margins() -> list[float]:
        out = []
        for prompt, answer, wrong, needle in items:
            gate["needle"] = (needle, needle + len(answer))
            with torch.no_grad():
                out.append(answer_logprob(logits_fn, prompt, answer) - answer_logprob(logits_fn, prompt, wrong))
        return out

    def set_alpha(value: float) -> None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.alpha.fill_(value)

    rows = []
    if args.weights:  # the checkpoint's own alpha first
        gate["filler"] = None
        rows.append(("trained", "learned", margins()))
        print(rows[-1], flush=True)
    set_alpha(0.0)
    floor = margins()
    rows.append(("0 (SWA + sinks)", "-", floor))
    print(rows[-1], flush=True)
    for alpha in args.alphas:
        set_alpha(alpha)
        for filler in fillers:
            gate["filler"] = filler
            rows.append((f"{alpha:g}", "learned" if filler is None else f"x{filler:g}", margins()))
            print(rows[-1], flush=True)
    distance = sum(len(p) - n for p, _, _, n in items) / len(items)
    lines = [f"Recall margin (nats, mean over {len(items)} held-out passkey prompts of {args.length} tokens; the needle "
             f"~{distance:.0f} tokens before the answer; window {config.window}) of a fresh conversion with an oracle write "
             f"gate: eta = {config.base_lr:g} on the needle's digits, x F on every other token (or the model's own "
             f"gates: learned). Settings: "
             f"{' '.join(s.removeprefix('allmem.') for s in settings)}; weights {args.weights or 'fresh'}.", "",
             "| alpha | filler eta | mean margin | wins | per prompt |", "|---|---|---:|---:|---|"]
    for alpha, filler, values in rows:
        mean = sum(values) / len(values)
        lines.append(f"| {alpha} | {filler} | {mean:+.2f} | {sum(v > 0 for v in values)}/{len(values)} | "
                     f"{[round(v, 2) for v in values]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if all(math.isfinite(v) for _, _, values in rows for v in values) else 1


if __name__ == "__main__":
    raise SystemExit(main())
