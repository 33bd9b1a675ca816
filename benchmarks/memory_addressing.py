"""Can the memory's queries find the right key? A direct look at the addressing of a converted model.

For passkey prompts (the built-in held-out tasks), teacher-forced on the answer: at answer digit j-1 the
query should retrieve the value written at the needle's digit j, whose key (with conv_init key_shift) was
computed from the needle's digit j-1. For every layer and memory head this prints the rank of that key
among all keys older than the window, scored by q . k after the memory's own conv, SiLU and norms (the
linear-attention proxy of a read), and the mean pairwise cosine of those keys. Rank 1 in a head means
the head can address the fact; ~5 means the query lands among the ten digit keys at random (a bag of
values). No training: it reads a fresh conversion or a checkpoint.

    .venv/bin/python benchmarks/memory_addressing.py                                 # fresh, key_init attention
    .venv/bin/python benchmarks/memory_addressing.py --key-init query                # fresh, keys = queries
    .venv/bin/python benchmarks/memory_addressing.py --key-init query --set weight_norm=false clip=null
    .venv/bin/python benchmarks/memory_addressing.py --weights out/recall-v5/checkpoints/step-000120/trainable.safetensors
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

RECALL_SETTINGS = ["allmem.read_residual=false", "allmem.qk_scale=1.0", "allmem.base_lr=0.1", "allmem.momentum_init=0.9",
                   "allmem.conv_init=key_shift", "allmem.window=64", "allmem.chunk=32"]


def features(memory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory's q, k, v features [1, T, H * d_h] (SiLU of the conv from an empty state, centred where
    the memory is) for one sequence x [1, T, d]."""
    qkv = memory._qkv(x)
    conv_state = torch.zeros(1, memory.conv_kernel - 1, qkv.shape[-1], dtype=qkv.dtype)
    qkv, _ = memory._conv(qkv, conv_state, torch.tensor([x.shape[1]]))
    return memory._features(qkv).split(memory.width, dim=-1)


def passkey_pair(tok, length: int, rng: random.Random) -> tuple[list[int], list[int], int, list[int]]:
    """A held-out passkey prompt (chat template applied), its answer's tokens, where the needle starts,
    and the counterfactual prompt: the same with every needle digit d replaced by (d + 5) % 10."""
    from allmem.distill.tasks import make_example

    ex = make_example("passkey", tok, length, rng, split="heldout")
    prompt = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    answer = tok(ex.answer.strip().rstrip("."), add_special_tokens=False).input_ids
    needle = next(p for p in range(len(prompt)) if prompt[p:p + len(answer)] == answer)
    counter = list(prompt)
    counter[needle:needle + len(answer)] = [tok.convert_tokens_to_ids(str((int(tok.decode([t])) + 5) % 10))
                                            for t in answer]
    return list(prompt), answer, needle, counter


def recall_model(settings: list[str], weights: str | None, length: int):
    """(model, tokenizer, AllMemConfig): SmolLM2 converted with the recall recipe and ``settings``
    (allmem.KEY=VALUE), in eval mode; with a checkpoint's or adapter's ``weights`` (safetensors) loaded
    into it, else, for a fresh centred memory, its means calibrated on one training-split prompt."""
    from safetensors.torch import load_file

    from allmem import calibrate_centre, convert, load_base
    from allmem.distill.recipe import load_recipe
    from allmem.distill.tasks import make_example

    recipe = load_recipe("smollm2-recall", settings)
    config = recipe.allmem_config()
    base, tok = load_base(recipe.base, dtype=torch.float32)
    model = convert(base, config, base_name=recipe.base).eval()
    if weights:
        _, unexpected = model.load_state_dict(load_file(weights), strict=False)
        if unexpected:
            raise SystemExit(f"error: {weights} has tensors this model lacks: {unexpected[:3]}")
    elif config.centre:
        calibration = make_example("passkey", tok, length, random.Random(11), split="train")
        calibrate_centre(model, [torch.tensor([tok(calibration.prompt).input_ids])])
    return model, tok, config


def projections(memory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory's normalised q, k and its values v [H, T, d_h] for one sequence x [1, T, d]."""
    q, k, v = features(memory, x)
    q = F.normalize(memory._split(memory.q_norm(q)), dim=-1)[0].transpose(0, 1)
    k = F.normalize(memory._split(memory.k_norm(k)), dim=-1)[0].transpose(0, 1)
    return q, k, memory._split(v)[0].transpose(0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="a checkpoint's trainable.safetensors (default: a fresh conversion)")
    parser.add_argument("--key-init", choices=["attention", "query"], default="attention")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more memory settings, e.g. weight_norm=false clip=null (allmem.KEY of the recipe)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model, tok, config = recall_model([*RECALL_SETTINGS, f"allmem.key_init={args.key_init}",
                                       *(f"allmem.{s}" for s in args.set)], args.weights, args.length)
    inputs, reads = {}, {}
    for i, layer in enumerate(model.model.layers):
        memory = layer.self_attn.memory
        memory.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        # out_norm's input is the fast weights' read [1, T, H * d_h], before the norm and the gate
        memory.out_norm.register_forward_pre_hook(lambda m, a, i=i: reads.__setitem__(i, a[0].detach()))

    window = config.window
    rng = random.Random(7)
    ranks: dict[int, list[torch.Tensor]] = {}
    read_ranks: dict[int, list[torch.Tensor]] = {}
    agreements: dict[int, list[torch.Tensor]] = {}
    gate_ratios: dict[int, list[torch.Tensor]] = {}
    cosines: dict[int, list[float]] = {}
    for _ in range(args.prompts):
        prompt, answer, needle, counter = passkey_pair(tok, args.length, rng)
        with torch.no_grad():
            model(torch.tensor([counter + answer]), use_cache=False)
            counter_inputs, counter_reads = dict(inputs), dict(reads)
            model(torch.tensor([prompt + answer]), use_cache=False)
        old = len(prompt) - window  # keys the window no longer covers
        for layer, x in inputs.items():
            memory = model.model.layers[layer].self_attn.memory
            q, k, v = projections(memory, x)
            read = F.normalize(memory._split(reads[layer])[0].transpose(0, 1), dim=-1)  # [H, T, d_h]
            values = F.normalize(v[:, :old], dim=-1)
            # what the needle changed: in the read at the answer, and in the needle's values
            _, _, counter_v = projections(memory, counter_inputs[layer])
            read_change = memory._split(reads[layer] - counter_reads[layer])[0].transpose(0, 1)  # [H, T, d_h]
            value_change = v - counter_v
            # the write gate: eta on the needle's tokens over eta on the other old tokens, per head
            eta = F.softplus(memory.eta_proj(x[0])).T  # [H, T]
            on_needle = torch.zeros(eta.shape[1], dtype=torch.bool)
            on_needle[needle:needle + len(answer)] = True
            on_needle[old:] = False
            filler = ~on_needle
            filler[old:] = False
            gate_ratios.setdefault(layer, []).append(eta[:, on_needle].mean(1) / eta[:, filler].mean(1))
            keys = k[:, :old]
            gram = keys @ keys.transpose(1, 2)
            n = gram.shape[-1]
            cosines.setdefault(layer, []).append(float((gram.sum((1, 2)) - n).mean() / (n * n - n)))
            for j in range(1, len(answer)):
                scores = keys @ q[:, len(prompt) + j - 1].unsqueeze(-1)  # [H, n, 1]
                target = scores[:, needle + j]
                ranks.setdefault(layer, []).append((scores > target[:, None]).sum((1, 2)) + 1)
                similarity = values @ read[:, len(prompt) + j - 1].unsqueeze(-1)  # [H, n, 1]
                target = similarity[:, needle + j]
                read_ranks.setdefault(layer, []).append((similarity > target[:, None]).sum((1, 2)) + 1)
                agreement = F.cosine_similarity(read_change[:, len(prompt) + j - 1], value_change[:, needle + j], dim=-1)
                agreements.setdefault(layer, []).append(agreement)  # [H]

    lines = [f"Needle-key rank among ~{old} keys older than the window (median over {args.prompts} passkey prompts x "
             f"answer digits), key_init {args.key_init} {' '.join(args.set)}, weights {args.weights or 'fresh conversion'}", "",
             "Read rank: rank of the needle's value among the same old values by cosine with what the fast weights "
             "actually return there (out_norm's input). Change agreement: cosine between how the read at the answer "
             "changes and how the needle's value changes when the needle's digits d become (d + 5) % 10 (the "
             "specific information the memory carries; 1 = the read moves exactly with the fact, 0 = not at all). "
             "Gate ratio: mean eta on the needle's tokens / on the other old tokens (1 = the write gate does not "
             "single the fact out).", "",
             "| layer | mean key cosine | median key rank per head | share of key rank 1 (best head) "
             "| median read rank per head | mean change agreement per head | gate ratio per head |",
             "|---:|---:|---|---:|---|---|---|"]
    for layer in sorted(ranks):
        r = torch.stack(ranks[layer]).float()
        rr = torch.stack(read_ranks[layer]).float()
        lines.append(f"| {layer} | {sum(cosines[layer]) / len(cosines[layer]):.3f} | "
                     f"{[int(v) for v in r.median(0).values]} | {float((r == 1).float().mean(0).max()):.2f} | "
                     f"{[int(v) for v in rr.median(0).values]} | "
                     f"{[round(float(a), 2) for a in torch.stack(agreements[layer]).mean(0)]} | "
                     f"{[round(float(g), 2) for g in torch.stack(gate_ratios[layer]).mean(0)]} |")
    every = torch.stack([torch.stack(a).mean(0) for a in agreements.values()])  # [layers, H]
    ratios = torch.stack([torch.stack(g).mean(0) for g in gate_ratios.values()])
    lines += ["", f"mean change agreement over all {every.numel()} heads: {float(every.mean()):.3f} "
              f"(best head {float(every.max()):.2f}; heads above 0.3: {int((every > 0.3).sum())}); "
              f"gate ratio: median {float(ratios.median()):.2f}, max {float(ratios.max()):.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
