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
    .venv/bin/python benchmarks/memory_addressing.py --weights out/recall-v5/checkpoints/step-000120/trainable.safetensors
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

RECALL_SETTINGS = ["allmem.read_residual=false", "allmem.qk_scale=1.0", "allmem.base_lr=0.1", "allmem.momentum_init=0.9",
                   "allmem.conv_init=key_shift", "allmem.window=64", "allmem.chunk=32"]


def queries_and_keys(memory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory's normalised q, k [H, T, d_h] for one sequence x [1, T, d] (conv from an empty state)."""
    qkv = memory._qkv(x)
    conv_state = torch.zeros(1, memory.conv_kernel - 1, qkv.shape[-1], dtype=qkv.dtype)
    qkv, _ = memory._conv(qkv, conv_state, torch.tensor([x.shape[1]]))
    q, k, _ = F.silu(qkv).split(memory.width, dim=-1)
    q = F.normalize(memory._split(memory.q_norm(q)), dim=-1)[0].transpose(0, 1)
    k = F.normalize(memory._split(memory.k_norm(k)), dim=-1)[0].transpose(0, 1)
    return q, k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="a checkpoint's trainable.safetensors (default: a fresh conversion)")
    parser.add_argument("--key-init", choices=["attention", "query"], default="attention")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--length", type=int, default=768)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from allmem import convert, load_base
    from allmem.distill.recipe import load_recipe
    from allmem.distill.tasks import make_example

    torch.set_num_threads(1)
    recipe = load_recipe("smollm2-recall", [*RECALL_SETTINGS, f"allmem.key_init={args.key_init}"])
    base, tok = load_base(recipe.base, dtype=torch.float32)
    model = convert(base, recipe.allmem_config(), base_name=recipe.base).eval()
    if args.weights:
        _, unexpected = model.load_state_dict(load_file(args.weights), strict=False)
        if unexpected:
            raise SystemExit(f"error: {args.weights} has tensors this model lacks: {unexpected[:3]}")
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.memory.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))

    window = recipe.allmem_config().window
    rng = random.Random(7)
    ranks: dict[int, list[torch.Tensor]] = {}
    cosines: dict[int, list[float]] = {}
    for _ in range(args.prompts):
        ex = make_example("passkey", tok, args.length, rng, split="heldout")
        prompt = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        answer = tok(ex.answer.strip().rstrip("."), add_special_tokens=False).input_ids
        needle = next(p for p in range(len(prompt)) if prompt[p:p + len(answer)] == answer)
        with torch.no_grad():
            model(torch.tensor([list(prompt) + answer]), use_cache=False)
        old = len(prompt) - window  # keys the window no longer covers
        for layer, x in inputs.items():
            q, k = queries_and_keys(model.model.layers[layer].self_attn.memory, x)
            keys = k[:, :old]
            gram = keys @ keys.transpose(1, 2)
            n = gram.shape[-1]
            cosines.setdefault(layer, []).append(float((gram.sum((1, 2)) - n).mean() / (n * n - n)))
            for j in range(1, len(answer)):
                scores = keys @ q[:, len(prompt) + j - 1].unsqueeze(-1)  # [H, n, 1]
                target = scores[:, needle + j]
                ranks.setdefault(layer, []).append((scores > target[:, None]).sum((1, 2)) + 1)

    lines = [f"Needle-key rank among ~{old} keys older than the window (median over {args.prompts} passkey prompts x "
             f"answer digits), key_init {args.key_init}, weights {args.weights or 'fresh conversion'}", "",
             "| layer | mean key cosine | median rank per head | share of rank 1 (best head) |", "|---:|---:|---|---:|"]
    for layer in sorted(ranks):
        r = torch.stack(ranks[layer]).float()
        lines.append(f"| {layer} | {sum(cosines[layer]) / len(cosines[layer]):.3f} | "
                     f"{[int(v) for v in r.median(0).values]} | {float((r == 1).float().mean(0).max()):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
