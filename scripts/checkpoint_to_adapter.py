"""Turn a distillation checkpoint into an adapter folder (bfloat16), for a warm start in a later
session (`train.init_adapter=DIR`) when `out/` does not survive, or for evaluating a run mid-way.

    .venv/bin/python scripts/checkpoint_to_adapter.py --checkpoint out/recall-v7/checkpoints/step-000200 \
        --recipe smollm2-recall --out docs/distill/recall/v7/warm-start -- allmem.key_init=query allmem.window=64 ...

The overrides after `--` must give the memory the run's settings (its run.sh lists them); the weights
must then fit exactly, or nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a step-NNNNNN folder with trainable.safetensors")
    parser.add_argument("--recipe", required=True, help="the recipe the run used")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="the run's recipe overrides (key=value)")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from allmem import convert, load_base
    from allmem.distill.recipe import load_recipe

    weights = args.checkpoint / "trainable.safetensors"
    if not weights.is_file():
        print(f"error: {weights} is missing: pass a checkpoint folder (out/RUN/checkpoints/step-NNNNNN)", file=sys.stderr)
        return 2
    recipe = load_recipe(args.recipe, args.overrides)
    base, _ = load_base(recipe.base, dtype=torch.float32)
    model = convert(base, recipe.allmem_config(), base_name=recipe.base)
    tensors = load_file(str(weights))
    params = model.memory_parameters()
    if set(tensors) != set(params) or any(tensors[k].shape != params[k].shape for k in params):
        print(f"error: {weights} does not fit the recipe's memory: pass the run's overrides after --", file=sys.stderr)
        return 2
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    model.save_pretrained(args.out, dtype=torch.bfloat16)
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
