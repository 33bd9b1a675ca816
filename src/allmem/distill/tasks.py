"""The built-in distillation corpus: long-context tasks whose answer sits far from the
question (passkey, RULER-style needles, variable tracking, key-value retrieval, planted facts,
"which sentence follows" over real documents), as prompts with known answers.

A ``length`` is measured in tokens of the given tokenizer; ``depth`` in [0, 1] places the
needle (0 = start of the context). The evaluation suite is ``allmem.eval.ruler``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from ..corpus import NOISE_SENTENCE, Document, documents, split_sentences, word_list

TASKS = ("passkey", "niah_multikey", "variable_tracking", "next_sentence")
# exact-recall tasks added for teaching the memory to write and read (answers are short and
# known, so a CE term on them is a direct signal where the full-attention teacher is weak)
RECALL_TASKS = ("kv_retrieval", "niah_multivalue", "fact_recall")
TRAIN_TASKS = TASKS + RECALL_TASKS

# fact_recall: (fact, question, answer) templates over word lists that avoid the demo's
# planted facts (the captain's dog, the meeting with Alice, the archive's passkey), which stay unseen
_FACT_OWNERS = ("baker", "pilot", "gardener", "librarian", "painter", "fisherman", "teacher", "doctor",
                "farmer", "sailor", "tailor", "miner", "poet", "judge", "nurse", "butcher")
_FACT_PETS = ("cat", "horse", "parrot", "goat", "rabbit", "hamster", "donkey", "turtle")
_FACT_NAMES = ("Pepper", "Mango", "Rusty", "Clover", "Juniper", "Pickle", "Nugget", "Waffle", "Tofu", "Ziggy",
               "Marble", "Basil", "Sprout", "Cinder", "Domino", "Maple", "Olive", "Pretzel", "Quincy", "Sable")
_FACT_PEOPLE = ("Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jonas", "Keiko",
                "Lorenzo", "Mirela", "Nadia", "Oskar", "Priya", "Rafael", "Sofia", "Tomas")
_FACT_COLOURS = ("crimson", "teal", "amber", "violet", "indigo", "olive", "coral", "ivory", "maroon", "turquoise")


def _fact(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        owner, pet, name = rng.choice(_FACT_OWNERS), rng.choice(_FACT_PETS), rng.choice(_FACT_NAMES)
        return (f"The name of the {owner}'s {pet} is {name}.", f"What is the name of the {owner}'s {pet}?", name)
    if kind == 1:
        person, room = rng.choice(_FACT_PEOPLE), str(rng.randint(100, 999))
        return (f"Note that the interview with {person} takes place in room {room}.",
                f"In which room does the interview with {person} take place?", room)
    person, colour = rng.choice(_FACT_PEOPLE), rng.choice(_FACT_COLOURS)
    return (f"{person} painted the garden fence {colour} last summer.",
            f"Which colour did {person} paint the garden fence?", colour)


@dataclass
class TaskExample:
    task: str
    context: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)
    """depth and key of the asked needle; "facts": every value the context states as a candidate
    answer (the distractor needles too), where there are several."""

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}"


@lru_cache(maxsize=1)
def _nouns() -> tuple[str, ...]:
    return tuple(w for w in word_list("nounlist") if 4 <= len(w) <= 9)


def _sentences(text: str) -> list[str]:
    return [s for s in split_sentences(text) if 20 <= len(s) <= 300]


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
    if task not in TRAIN_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TRAIN_TASKS}")
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
        return TaskExample(task, context, question, f" {values[target]}.", {"depth": depth, "key": nouns[target],
                                                                            "facts": values})

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

    if task == "kv_retrieval":
        # a long list of key: value lines (the whole context), one key asked (LongEval / MQAR in text)
        lines, used = [], _needle_budget(tokenizer, length, intro)
        words = _nouns()
        while used > 0:
            key = f"{rng.choice(words)}-{rng.choice(words)}"
            lines.append((key, str(rng.randint(100000, 999999))))
            used -= 14
        target = rng.randrange(max(1, int(len(lines) * 0.6)))
        question_key, value = lines[target]
        lines = [(k, v) for i, (k, v) in enumerate(lines) if i == target or k != question_key]
        context = "Here is a list of keys and their values.\n" + "\n".join(f"{k}: {v}" for k, v in lines)
        question = f"What is the value of the key {question_key}? The value of {question_key} is"
        return TaskExample(task, context, question, f" {value}.", {"depth": target / max(1, len(lines)), "key": question_key,
                                                                   "facts": [v for _, v in lines]})

    if task == "niah_multivalue":
        noun = rng.choice(_nouns())
        values = [str(rng.randint(1000000, 9999999)) for _ in range(3)]
        needles = [f"One of the special magic numbers for {noun} is: {v}." for v in values]
        depths = sorted([depth] + [rng.uniform(depth, 0.7) for _ in values[1:]])
        question = f"What are all the special magic numbers for {noun} mentioned in the provided text? The special magic numbers for {noun} are"
        context = intro + " " + hay.fill(_needle_budget(tokenizer, length, intro, question, *needles),
                                         list(zip(depths, needles)))
        return TaskExample(task, context, question, " " + ", ".join(values) + ".", {"depth": depth, "key": noun})

    if task == "fact_recall":
        fact, question, answer = _fact(rng)
        context = hay.fill(_needle_budget(tokenizer, length, fact, question), [(depth, fact)])
        return TaskExample(task, context, question + " Answer:", f" {answer}.", {"depth": depth, "key": answer})

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
