"""How much of what each layer's window loses does the memory give back, at a passkey's answer? And how
much of it is the code itself (the needle-specific columns)?

Per converted layer of SmolLM2, the attention-transfer error (``allmem.distill.losses.attention_transfer_loss``):
||layer output - pretrained full attention on the same inputs||^2 / ||full attention||^2, for SWA + sinks
(alpha = 0) and for AllMem (the memory on), on held-out passkey prompts whose needle lies far beyond the
window, teacher-forced with their answer. Two sets of rows: the answer (the rows that predict the code,
where the full attention reads the needle) and every row beyond the window. "Closed" is the share of the
window's error the memory removes (negative: the memory adds error). Both systems see the inputs their own
model gives each layer, so this is each layer's local error, not the teacher's.

    .venv/bin/python benchmarks/transfer_gap.py --weights out/recall-v10/adapter-step-001000/adapter.safetensors \
        --set centre=true key_init=query output_init=attention [--prompts 4] [--length 768] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics

import torch

from allmem.distill.losses import attention_transfer_loss
from memory_addressing import RECALL_SETTINGS, passkey_pair, recall_model


def layer_outputs(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (its output, the pretrained full attention on the same inputs), both [T, d]."""
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        outputs.append((output[0][0], module.teacher_attention(hidden, kwargs["allmem_segment"])[0]))

    hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def layer_errors(model, ids: list[int], counter: list[int], answer_rows: slice, beyond: int) -> dict[str, list[float]]:
    """Per layer, the transfer error on the answer rows and on every row from position ``beyond`` on, and
    the needle-specific error at the answer: how far the change of the layer's output between the prompt
    and its counterfactual (another code in the needle, the same answer after it) is from the change of
    the full attention's, over the full attention's change (1 = the layer passes on none of the code)."""
    length = len(ids)
    answer = torch.zeros(1, length, dtype=torch.bool)
    answer[0, answer_rows] = True
    far = torch.zeros(1, length, dtype=torch.bool)
    far[0, beyond:] = True
    errors: dict[str, list[float]] = {"answer": [], "far": [], "needle": []}
    for (out, target), (out_cf, target_cf) in zip(layer_outputs(model, ids), layer_outputs(model, counter)):
        errors["answer"].append(float(attention_transfer_loss(out[None], target[None], answer)))
        errors["far"].append(float(attention_transfer_loss(out[None], target[None], far)))
        errors["needle"].append(float(attention_transfer_loss((out - out_cf)[None], (target - target_cf)[None], answer)))
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="an adapter's or checkpoint's safetensors (default: a fresh memory)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more memory settings (allmem.KEY)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()

    settings = RECALL_SETTINGS + [f"allmem.{s}" for s in args.set]
    model, tok, config = recall_model(settings, args.weights, args.length)
    rng = random.Random(7)
    kinds = ("answer", "far", "needle")
    sums = {(system, rows): [0.0] * len(model.model.layers) for system in ("swa", "allmem") for rows in kinds}
    for _ in range(args.prompts):
        prompt, answer, _, counter = passkey_pair(tok, args.length, rng)
        ids = prompt + answer
        rows = slice(len(prompt) - 1, len(ids) - 1)  # the rows whose next token is the answer's
        for system in ("swa", "allmem"):
            with model.memory_disabled() if system == "swa" else contextlib.nullcontext():
                errors = layer_errors(model, ids, counter + answer, rows, config.window + config.sinks)
            for kind, values in errors.items():
                sums[(system, kind)] = [s + v / args.prompts for s, v in zip(sums[(system, kind)], values)]

    def closed(kind: str, layer: int) -> float:
        swa, mem = sums[("swa", kind)][layer], sums[("allmem", kind)][layer]
        return 1 - mem / swa if swa > 0 else 0.0

    lines = [
        f"Attention-transfer error per layer (mean over {args.prompts} held-out passkey prompts of {args.length} tokens, "
        f"window {config.window} + {config.sinks} sinks), weights {args.weights or 'fresh'}.",
        "",
        "Needle-specific: at the answer rows, ||change of the layer's output - change of the full attention's||^2 / "
        "||change of the full attention's||^2 between the prompt and the same prompt with another code in the needle "
        "(the same answer after it); 1 = the layer passes on nothing of the code, 0 = all of it.",
        "",
        "| layer | answer rows: SWA + sinks | AllMem | closed | rows beyond the window: SWA + sinks | AllMem | closed "
        "| needle-specific: SWA + sinks | AllMem |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in range(len(model.model.layers)):
        lines.append(f"| {layer} | {sums[('swa', 'answer')][layer]:.3f} | {sums[('allmem', 'answer')][layer]:.3f} | "
                     f"{closed('answer', layer):+.0%} | {sums[('swa', 'far')][layer]:.3f} | "
                     f"{sums[('allmem', 'far')][layer]:.3f} | {closed('far', layer):+.0%} | "
                     f"{sums[('swa', 'needle')][layer]:.3f} | {sums[('allmem', 'needle')][layer]:.3f} |")
    mean = {key: sum(values) / len(values) for key, values in sums.items()}
    lines += ["", "mean over layers: answer rows "
              f"{mean[('swa', 'answer')]:.3f} -> {mean[('allmem', 'answer')]:.3f} "
              f"({1 - mean[('allmem', 'answer')] / mean[('swa', 'answer')]:+.0%}); rows beyond the window "
              f"{mean[('swa', 'far')]:.3f} -> {mean[('allmem', 'far')]:.3f} "
              f"({1 - mean[('allmem', 'far')] / mean[('swa', 'far')]:+.0%}); needle-specific at the answer, median "
              f"over layers (a layer whose full attention barely changes with the code divides by almost nothing) "
              f"{statistics.median(sums[('swa', 'needle')]):.3f} -> {statistics.median(sums[('allmem', 'needle')]):.3f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
