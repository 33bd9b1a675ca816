"""Long-context tasks whose answer sits far from the question: passkey, RULER-style needles,
variable tracking, and "which sentence follows" over real documents.

Used both as the built-in distillation corpus and as the synthetic evaluation suite. A
``length`` is measured in tokens of the given tokenizer; ``depth`` in [0, 1] places the
needle (0 = start of the context).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from .corpus import NOISE_SENTENCE, Document, documents

TASKS = ("passkey", "niah_multikey", "variable_tracking", "next_sentence")


@dataclass
class TaskExample:
    task: str
    context: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}"


@lru_cache(maxsize=1)
def _nouns() -> tuple[str, ...]:
    try:
        from importlib.resources import files

        text = files("wonderwords").joinpath("assets/nounlist.txt").read_text()
        words = tuple(w.strip() for w in text.splitlines() if w.strip().isalpha() and 4 <= len(w.strip()) <= 9)
        if words:
            return words
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return ("apple", "river", "garden", "window", "pencil", "castle", "forest", "rocket", "violin", "lantern")


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if 20 <= len(p) <= 300]


class _Haystack:
    """Sentences to fill a context up to a token budget."""

    def __init__(self, tokenizer, rng: random.Random, docs: list[Document] | None):
        self.tokenizer, self.rng, self.docs = tokenizer, rng, docs

    def sentences(self, budget_tokens: int) -> list[str]:
        out, used = [], 0
        if self.docs:
            order = self.rng.sample(self.docs, len(self.docs))
            for doc in order:
                for s in _sentences(doc.text):
                    out.append(s)
                    used += len(s) // 4 + 1
                    if used >= budget_tokens * 1.3:
                        return out
        while used < budget_tokens * 1.3:
            out.append(NOISE_SENTENCE)
            used += 22
        return out

    def fill(self, budget_tokens: int, needles: list[tuple[float, str]]) -> str:
        """Join haystack sentences, trimmed to ``budget_tokens``, with needles at depths."""
        hay = self.sentences(budget_tokens)
        lo, hi = 0, len(hay)
        while lo < hi:  # the longest prefix within budget (tokens counted for real)
            mid = (lo + hi + 1) // 2
            if len(self.tokenizer(" ".join(hay[:mid]), add_special_tokens=False).input_ids) <= budget_tokens:
                lo = mid
            else:
                hi = mid - 1
        hay = hay[: max(lo, 1)]
        for depth, needle in sorted(needles, key=lambda x: -x[0]):
            hay.insert(int(round(depth * len(hay))), needle)
        return " ".join(hay)


def _needle_budget(tokenizer, length: int, *texts: str) -> int:
    used = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    return max(16, length - used - 8)


def make_example(task: str, tokenizer, length: int, rng: random.Random, *, depth: float | None = None,
                 split: str = "train", haystack: str = "auto") -> TaskExample:
    """One example of ``task`` with a context of about ``length`` tokens.

    haystack: "noise" (the repeated noise sentence), "essays" (real text of the split) or
    "auto" (noise for passkey, real text otherwise).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    depth = rng.uniform(0.0, 0.6) if depth is None else depth
    use_noise = haystack == "noise" or (haystack == "auto" and task == "passkey")
    docs = None if use_noise else documents(split)
    hay = _Haystack(tokenizer, rng, docs)
    intro = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it."

    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        question = "What is the pass key? The pass key is"
        context = intro + " " + hay.fill(_needle_budget(tokenizer, length, intro, needle, question), [(depth, needle)])
        return TaskExample(task, context, question, f" {key}.", {"depth": depth, "key": key})

    if task == "niah_multikey":
        nouns = rng.sample(_nouns(), 4)
        values = [str(rng.randint(1000000, 9999999)) for _ in nouns]
        needles = [f"One of the special magic numbers for {n} is: {v}." for n, v in zip(nouns, values)]
        target = rng.randrange(len(nouns))
        question = f"What is the special magic number for {nouns[target]} mentioned in the provided text? The special magic number for {nouns[target]} mentioned in the provided text is"
        depths = [depth if i == target else rng.uniform(0, 1) for i in range(len(nouns))]
        budget = _needle_budget(tokenizer, length, intro, question, *needles)
        context = intro + " " + hay.fill(budget, list(zip(depths, needles)))
        return TaskExample(task, context, question, f" {values[target]}.", {"depth": depth, "key": nouns[target]})

    if task == "variable_tracking":
        value = str(rng.randint(10000, 99999))
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        question = f"Find all variables that are assigned the value {value} in the text above. Answer: the variables are"
        step = (0.8 - depth) / len(chain)
        placed = [(depth + i * step, c) for i, c in enumerate(chain)]
        budget = _needle_budget(tokenizer, length, question, *chain)
        context = hay.fill(budget, placed)
        return TaskExample(task, context, question, " " + ", ".join(names) + ".", {"depth": depth, "key": value})

    # next_sentence: quote a sentence from early in a real document, ask for the one after it
    pool = [d for d in documents(split) if len(_sentences(d.text)) > 8]
    doc = rng.choice(pool)
    sents = _sentences(doc.text)
    i = rng.randrange(0, max(1, min(len(sents) - 2, int(len(sents) * 0.5))))
    question = f'Quote the sentence that comes right after "{sents[i]}" in the text above.'
    others = _Haystack(tokenizer, rng, [d for d in documents(split) if d.name != doc.name])
    lead = " ".join(sents)
    lead_ids = tokenizer(lead, add_special_tokens=False).input_ids
    remaining = _needle_budget(tokenizer, length, question) - len(lead_ids)
    context = lead if remaining <= 16 else others.fill(remaining, [(0.0, lead)])
    return TaskExample(task, context, question, " " + sents[i + 1], {"doc": doc.name, "depth": 0.0})
