"""``allmem eval``: benchmarks, the synthetic suite, perplexity by position and lm-eval tasks,
for one or more systems compared in one table; and ``mqar``, a recall probe of the memories
on tiny models trained from scratch (``allmem.eval.mqar``).

``register(subparsers)`` adds the command to the ``allmem`` parser. Systems are specs
(``allmem.eval.systems``): ``full:smollm2``, ``swa:smollm2?window=256&sinks=4``,
``allmem:PATH_TO_ADAPTER``, ... Each system writes under ``OUT/<system slug>/`` (resumable);
the comparison goes to ``OUT/summary.md`` and ``OUT/summary.json`` (``ppl.*`` for perplexity).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SYSTEMS_HELP = ("system specs compared in one table, e.g. full:smollm2 'swa:smollm2?window=256&sinks=4' "
                "'allmem:PATH_TO_ADAPTER' (quote specs with ? or &)")


def _systems_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--systems", nargs="+", required=True, metavar="SPEC", help=SYSTEMS_HELP)
    p.add_argument("--out", required=True, help="output folder (reruns resume from what is there)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _chat_arg(p: argparse.ArgumentParser, default_text: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help=f"wrap prompts in the tokenizer's chat template ({default_text})")
    g.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion prompts")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _handled(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures (bad spec, bad data, missing files or packages) as one error line."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from .common import DataFormatError
        from .systems import SystemSpecError

        try:
            return func(args)
        except (SystemSpecError, DataFormatError, FileNotFoundError, NotImplementedError, ImportError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _each_system(specs: Sequence[str]):
    """Load the systems one after the other (each is dropped before the next loads)."""
    from .systems import load_system, parse_spec

    for spec in specs:
        parse_spec(spec)  # fail on a typo before loading anything
    names = [parse_spec(s).name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two systems share a name: {names}; add name=... to a spec")
    for spec in specs:
        system = load_system(spec)
        try:
            yield system
        finally:
            system.close()


# ------------------------------------------------------------------ long-context benchmarks
def _counting(generate: Callable[[str, int], str], total: int, done: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc=desc, unit="sample", disable=quiet, dynamic_ncols=True)

    def fn(prompt: str, max_new_tokens: int) -> str:
        text = generate(prompt, max_new_tokens)
        bar.update(1)
        return text

    return fn, bar


def _benchmark(args: argparse.Namespace, name: str) -> int:
    from . import infinitebench, longbench, lveval
    from .common import format_table, hf_chat_template, read_predictions, subset_preds_path

    out = Path(args.out)
    if name == "longbench":
        loader = lambda s: longbench.load_longbench(args.data_dir, s, limit=args.limit)  # noqa: E731
        stems = {s: s for s in args.subsets}
    elif name == "infinitebench":
        loader = lambda s: infinitebench.load_infinitebench(args.data_dir, s, limit=args.limit)  # noqa: E731
        stems = {s: s for s in args.subsets}
    else:
        loader = lambda s: lveval.load_lveval(args.data_dir, s, args.level, limit=args.limit)  # noqa: E731
        stems = {s: lveval.file_stem(s, args.level) for s in args.subsets}
    samples = {s: loader(s) for s in args.subsets}  # validates every file before any model loads
    columns: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for system in _each_system(args.systems):
        from .systems import slug

        run_dir = out / slug(system.name)
        chat = args.chat if args.chat is not None else bool(getattr(system.tokenizer, "chat_template", None))
        template = hf_chat_template(system.tokenizer, enable_thinking=False) if chat else None
        done = 0
        for s, items in samples.items():
            ids = {r["id"] for r in read_predictions(subset_preds_path(run_dir, stems[s]))}
            done += sum(1 for item in items if item.id in ids)
        total = sum(len(items) for items in samples.values())
        generate = lambda prompt, n, system=system: system.generate(prompt, n, chat=False)  # noqa: E731
        fn, bar = _counting(generate, total, done, f"{name} {system.name}", args.quiet)
        common = dict(subsets=args.subsets, chat_template=template, limit=args.limit)
        if name == "longbench":
            result = longbench.run_longbench(args.data_dir, run_dir, fn, system.tokenizer, args.max_length, **common)
        elif name == "infinitebench":
            result = infinitebench.run_infinitebench(args.data_dir, run_dir, fn, system.tokenizer, args.max_length, **common)
        else:
            result = lveval.run_lveval(args.data_dir, run_dir, fn, system.tokenizer, args.max_length, level=args.level, **common)
        bar.close()
        columns[system.name] = {**result.scores, "average": result.average}
        details[system.name] = result.to_json()
    table = format_table(columns)
    (out / "summary.md").write_text(f"{name} (100 x score; rows: subsets, then the average)\n\n{table}", encoding="utf-8")
    _write_json(out / "summary.json", details)
    print(table)
    return 0


@_handled
def cmd_longbench(args: argparse.Namespace) -> int:
    return _benchmark(args, "longbench")


@_handled
def cmd_infinitebench(args: argparse.Namespace) -> int:
    return _benchmark(args, "infinitebench")


@_handled
def cmd_lveval(args: argparse.Namespace) -> int:
    return _benchmark(args, "lveval")


# ------------------------------------------------------------------ synthetic
@_handled
def cmd_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import comparison_markdown, plan_cells, run_synthetic
    from .systems import slug

    plan_cells(args.tasks, args.lengths, args.depths, args.samples)  # validate before loading models
    out = Path(args.out)
    results = []
    for system in _each_system(args.systems):
        results.append(run_synthetic(
            system, args.tasks, args.lengths, args.depths, args.samples, out / slug(system.name),
            chat=args.chat, max_new_tokens=args.max_new_tokens, seed=args.seed, split=args.split,
            progress=not args.quiet, margin=args.margin,
        ))
    text = comparison_markdown(results) + "\n" + "\n".join(r.markdown() for r in results)
    (out / "summary.md").write_text(text, encoding="utf-8")
    _write_json(out / "summary.json", {r.system: r.to_json() for r in results})
    print(comparison_markdown(results))
    return 0


# ------------------------------------------------------------------ perplexity
@_handled
def cmd_ppl(args: argparse.Namespace) -> int:
    from .ppl import run_ppl
    from .systems import parse_spec

    for spec in args.systems:
        parse_spec(spec)
    result = run_ppl(args.systems, args.out, lengths=args.lengths, edges=args.buckets, source=args.source,
                     text_file=args.text_file, docs=args.docs, progress=not args.quiet, plot=not args.no_plot)
    print(result.markdown())
    print(f"\n{Path(args.out) / 'ppl.md'}, ppl.json" + ("" if args.no_plot else ", ppl.png"))
    return 0


# ------------------------------------------------------------------ lm-eval
@_handled
def cmd_lm_eval(args: argparse.Namespace) -> int:
    from .common import format_table
    from .lm_eval_adapter import simple_evaluate
    from .systems import slug

    out = Path(args.out)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    columns: dict[str, dict[str, float]] = {}
    for system in _each_system(args.systems):
        results = simple_evaluate(system, args.tasks, include_path=args.include_path, limit=limit,
                                  include_defaults=not args.only_include_path,
                                  num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
                                  progress=not args.quiet)
        _write_json(out / slug(system.name) / "results.json",
                    {k: results.get(k) for k in ("results", "configs", "versions", "n-shot", "config")})
        column: dict[str, float] = {}
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key \
                        and key not in ("sample_len",):
                    column[f"{task} {key.split(',')[0]}"] = float(value)
        columns[system.name] = column
    table = format_table(columns, row_label="task metric")
    (out / "summary.md").write_text(f"lm-evaluation-harness (accuracies as fractions)\n\n{table}", encoding="utf-8")
    _write_json(out / "summary.json", columns)
    print(table)
    return 0


# ------------------------------------------------------------------ MQAR probe
@_handled
def cmd_mqar(args: argparse.Namespace) -> int:
    import torch

    from .mqar import ProbeConfig, parse_grid, parse_settings, run_grid, run_sweep, with_settings

    torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    cfg = ProbeConfig(d_model=args.d_model, window=args.window, sinks=args.sinks, chunk=args.chunk, steps=args.steps,
                      budget_s=args.budget_s, seed=args.seed, eval_examples=args.eval_examples)
    cfg = with_settings(cfg, parse_settings(args.set or []))
    if args.sweep:
        run_sweep(args.sweep, grid, cfg, args.out, progress=not args.quiet)
        print((Path(args.out) / "sweep.md").read_text())
    else:
        run_grid(args.mixers, grid, cfg, args.out, progress=not args.quiet, plot=not args.no_plot)
        print((Path(args.out) / "mqar.md").read_text())
    return 0


# ------------------------------------------------------------------ parser
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` and its subcommands to an ``argparse`` subparsers object."""
    from .infinitebench import SUBSETS as IB_SUBSETS
    from .infinitebench import TRUNCATE_LEN
    from .longbench import PAPER_SUBSETS
    from .lveval import LEVELS
    from .lveval import SUBSETS as LV_SUBSETS
    from .ppl import SOURCES
    from .ruler import SYNTHETIC_TASKS

    ev = subparsers.add_parser(
        "eval", help="evaluate systems: long-context benchmarks, synthetic suite, perplexity, lm-eval tasks, MQAR probe",
        description="Evaluate one or more systems (full attention, SWA + sinks, AllMem, ...) and compare them "
                    "in one table. Outputs (markdown + JSON) go under --out; interrupted runs resume.",
    )
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")

    p = sub.add_parser("longbench", help="LongBench v1 from local files (official prompts, truncation, metrics)",
                       description="LongBench v1 from the official {subset}.jsonl files in --data-dir.")
    p.add_argument("--data-dir", required=True, help="folder with the official LongBench {subset}.jsonl files")
    _systems_arg(p)
    p.add_argument("--max-length", type=int, default=31500, help="prompt budget in tokens, middle truncation (default 31500)")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each subset")
    p.add_argument("--subsets", nargs="+", default=list(PAPER_SUBSETS), help="default: the paper's six")
    _chat_arg(p, "default: when the tokenizer has one; never for triviaqa and the other few-shot subsets")
    p.set_defaults(func=cmd_longbench)

    p = sub.add_parser("infinitebench", help="InfiniteBench longbook QA from local files",
                       description="InfiniteBench longbook_qa_eng / longbook_qa_chn from local JSONL files.")
    p.add_argument("--data-dir", required=True, help="folder with longbook_qa_eng.jsonl / longbook_qa_chn.jsonl")
    _systems_arg(p)
    p.add_argument("--max-length", type=int, default=TRUNCATE_LEN, help=f"prompt budget in tokens (default {TRUNCATE_LEN})")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--subsets", nargs="+", default=list(IB_SUBSETS))
    _chat_arg(p, "default: when the tokenizer has one")
    p.set_defaults(func=cmd_infinitebench)

    p = sub.add_parser("lveval", help="LV-Eval from local files (keyword-gated F1)",
                       description="LV-Eval from the official {subset}_{level}.jsonl files.")
    p.add_argument("--data-dir", required=True, help="folder with {subset}_{level}.jsonl files")
    _systems_arg(p)
    p.add_argument("--level", default="128k", choices=LEVELS, help="length level (default 128k)")
    p.add_argument("--max-length", type=int, default=15500, help="prompt budget in tokens (default 15500, the official default)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--subsets", nargs="+", default=list(LV_SUBSETS))
    _chat_arg(p, "default: when the tokenizer has one")
    p.set_defaults(func=cmd_lveval)

    p = sub.add_parser("synthetic", help="passkey and RULER tasks at any length (no download)",
                       description="Passkey and RULER-style tasks (NIAH single/multi-key/value/query, variable "
                                   "tracking, common/frequent words) at target lengths measured with each "
                                   "system's tokenizer, needle depth swept.")
    _systems_arg(p)
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single_1", "niah_single_2", "niah_multikey_1", "vt"],
                   choices=SYNTHETIC_TASKS, metavar="TASK",
                   help=f"tasks (default passkey niah_single_1 niah_single_2 niah_multikey_1 vt); all: {' '.join(SYNTHETIC_TASKS)}")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1] (0 = start of the context)")
    p.add_argument("--samples", type=int, default=2, help="samples per (task, length, depth) cell (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate for every task (default: RULER's per-task budgets, 16 for passkey)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["all", "train", "heldout"], default="all", help="essays of the essay haystacks")
    p.add_argument("--margin", action="store_true",
                   help="also report the recall margin (log p(right) - log p(a wrong answer of the same form), nats) "
                        "of every example with a numeric answer: continuous where accuracy is 0/1")
    _chat_arg(p, "default: when the tokenizer has one; RULER's answer prefix follows the template")
    p.set_defaults(func=cmd_synthetic)

    p = sub.add_parser("ppl", help="perplexity by position on long real text",
                       description="Perplexity bucketed by position in windows of --lengths tokens, one column per "
                                   "system; a PNG plot marks the base model's trained context.")
    _systems_arg(p)
    p.add_argument("--lengths", nargs="+", type=int, default=[16384], help="window lengths in tokens (default 16384)")
    p.add_argument("--buckets", nargs="+", type=int, default=None, metavar="EDGE",
                   help="bucket edges in tokens (default 0 256 512 1024 ... doubling)")
    p.add_argument("--source", choices=SOURCES, default="heldout",
                   help="built-in text when no --text-file: heldout documents (default), pydoc, essays, stdlib (Python source)")
    p.add_argument("--text-file", default=None, help="score this UTF-8 text file instead")
    p.add_argument("--docs", type=int, default=1, help="windows per length, cut one after the other (default 1)")
    p.add_argument("--no-plot", action="store_true", help="skip ppl.png (no matplotlib needed)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks through the allmem adapter",
                       description="Run lm-evaluation-harness tasks (needs `pip install lm_eval`; task data is "
                                   "the user's) with each system as the model.")
    _systems_arg(p)
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (e.g. arc_easy hellaswag)")
    p.add_argument("--include-path", nargs="+", default=None, help="extra folders of task YAML files")
    p.add_argument("--only-include-path", action="store_true",
                   help="do not index lm-eval's built-in tasks (faster when all tasks come from --include-path)")
    p.add_argument("--limit", type=float, default=None, help="samples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--apply-chat-template", action="store_true", help="format requests with the chat template")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("mqar", help="multi-query associative recall probe: tiny models trained from scratch",
                       description="MQAR (Zoology) with every query farther back than the window: a 2-layer Llama "
                                   "trained from scratch with full attention (ceiling), SWA alone (floor), SWA + the "
                                   "AllMem memory and SWA + Mamba-2 of the same state size. Writes mqar.json/.md/.png "
                                   "(or sweep.json/.md with --sweep) under --out; finished points are skipped on rerun.")
    p.add_argument("--mixers", nargs="+", default=["full", "swa", "allmem", "mamba2"], metavar="MIXER",
                   help="full swa allmem mamba2 (default: all four)")
    p.add_argument("--grid", nargs="+", default=["128:8", "256:16", "512:32", "1024:64"], metavar="LEN:PAIRS",
                   help="grid points seq_len:pairs (default 128:8 256:16 512:32 1024:64)")
    p.add_argument("--d-model", type=int, default=128, help="backbone width (head_dim 64; default 128)")
    p.add_argument("--window", type=int, default=64, help="SWA window W; queries lie >= W after the pairs (default 64)")
    p.add_argument("--sinks", type=int, default=0, help="attention sinks (default 0)")
    p.add_argument("--chunk", type=int, default=32, help="memory chunk C (default 32)")
    p.add_argument("--steps", type=int, default=3000, help="at most this many training steps per point (default 3000)")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per point (default 300)")
    p.add_argument("--eval-examples", type=int, default=256, help="held-out examples per point (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="AllMemConfig overrides (base_lr=0.3 expansion=2 inner_loss=dot clip=none conv_kernel=0 ...) "
                        "and training keys lr, batch, alpha_init, warmup, weight_decay, vocab, tie_embeddings, "
                        "queries, key_free_filler, mixture (true: train on (L, P), (L/2, P/2), ... in turn)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="VARIANT",
                   help="sweep the allmem mixer instead: each VARIANT is comma-separated KEY=VALUE overrides on top "
                        "of --set ('default' = none), e.g. default base_lr=1.0 base_lr=1.0,clip=none")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU one thread beats two waiting on each other)")
    p.add_argument("--out", required=True, help="output folder (reruns resume from what is there)")
    p.add_argument("--no-plot", action="store_true", help="skip mqar.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mqar)
    return ev


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m allmem.eval.cli eval ...``: the same as ``allmem eval ...``."""
    import logging

    parser = argparse.ArgumentParser(prog="allmem", description="AllMem evaluation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
