"""The synthetic evaluation suite: the passkey test exactly as EVAL_SPEC.md states it, and the
RULER tasks (Hsieh et al., 2024) with RULER's templates, answer prefixes, needle formats and
haystacks, at any length in tokens of the system's tokenizer. ``allmem.eval.synthetic`` runs
and scores them; the distillation corpus is ``allmem.distill.tasks``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

from ..corpus import NOISE_SENTENCE, essay_documents, split_sentences, word_list

RULER_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)  # fmt: skip
SYNTHETIC_TASKS = ("passkey", *RULER_TASKS)

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
RULER_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
_NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What are all the special magic {type_v} for {query} mentioned in the provided text?"
)
_NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
# RULER's own rewrite of the template when a single value is asked for ("Some" -> "A", ...).
_NIAH_TEMPLATE_ONE = (
    "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n{context}\n"
    "What is the special magic {type_v} for {query} mentioned in the provided text?"
)
_NIAH_PREFIX_ONE = " The special magic {type_v} for {query} mentioned in the provided text is"
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's spelling; published numbers used it.
_VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class NiahConfig:
    """One RULER needle-in-a-haystack variant (RULER's ``synthetic.yaml``)."""

    haystack: str  # "noise" (the repeated noise sentence), "essay" or "needle" (distractor needles)
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str
    keys: int = 1  # needles with distinct keys (one queried unless ``queries`` > 1)
    values: int = 1  # values per key, all asked for
    queries: int = 1  # keys asked for at once


NIAH_CONFIGS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", keys=4, queries=4),
}

# RULER's ``tokens_to_generate``; the passkey answer is a 5-digit number.
MAX_NEW_TOKENS: dict[str, int] = {"passkey": 16, **dict.fromkeys(NIAH_CONFIGS, 128), "vt": 30, "cwe": 120, "fwe": 50}
# How a prediction is scored (see ``allmem.eval.synthetic``): RULER scores all of these tasks
# with string_match_all; the passkey counts the first integer generated.
TASK_METRIC: dict[str, str] = {"passkey": "passkey", **dict.fromkeys(RULER_TASKS, "string_match_all")}
# Tasks with a needle whose depth is swept; the others ignore ``depth``.
DEPTH_TASKS = ("passkey", *NIAH_CONFIGS, "vt")


@dataclass
class SyntheticExample:
    """One prompt of the evaluation suite.

    ``input`` is what a user turn holds (instruction, context, question) and ``answer_prefix``
    RULER's start of the answer, appended after the user turn (after the chat template when one
    is used). ``length`` counts the tokens of ``input + answer_prefix``.
    """

    task: str
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int
    depth: float | None
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    @property
    def metric(self) -> str:
        return TASK_METRIC[self.task]

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.task]


@lru_cache(maxsize=None)
def _word_list(name: str) -> tuple[str, ...]:
    """RULER's pool: the distinct lowercased words of ``word_list(name)``, sorted."""
    return tuple(sorted({w.lower() for w in word_list(name)}))


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits
    if kind == "words":
        return f"{rng.choice(_word_list('adjectivelist'))}-{rng.choice(_word_list('nounlist'))}"
    if kind == "uuids":
        import uuid

        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


@lru_cache(maxsize=4)
def essay_sentences(split: str = "all") -> tuple[str, ...]:
    """Sentences of the Paul Graham essays (RULER's essay haystack), in document order.

    split: "all" (every essay: 150k tokens, no repetition up to that length), "train" or
    "heldout" (the corpus split; the held-out essays are only about 10k tokens and repeat)."""
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    docs = [d for d in essay_documents() if split == "all" or d.heldout == (split == "heldout")]
    out: list[str] = []
    for doc in docs:
        out += split_sentences(doc.text)
    if not out:
        raise ValueError(f"no essay text in split {split!r}")
    return tuple(out)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` as the model sees it (``tokenizer(text)``, special tokens included)."""
    return len(tokenizer(text).input_ids)


def _fit(tokenizer, build, target: int, *, what: str, start: int = 8) -> tuple[int, str, int]:
    """The largest n >= 1 with count_tokens(build(n)) <= target: doubling, then bisection.

    ``build`` must grow (near) monotonically with n; the result is verified, so a slightly
    non-monotone build (a reshuffled list) still never exceeds ``target``."""
    def size(n: int) -> tuple[str, int]:
        text = build(n)
        return text, count_tokens(tokenizer, text)

    text, used = size(1)
    if used > target:
        raise ValueError(
            f"{what}: even the smallest prompt takes {used} tokens, more than the requested length {target}; "
            "ask for a longer length"
        )
    lo, lo_text, lo_used = 1, text, used
    hi = max(2, start)
    while True:
        text, used = size(hi)
        if used > target:
            break
        lo, lo_text, lo_used = hi, text, used
        hi *= 2
        if hi > 64 * target + 64:
            raise RuntimeError(f"{what}: the prompt does not grow with its haystack (tokenizer problem?)")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        text, used = size(mid)
        if used <= target:
            lo, lo_text, lo_used = mid, text, used
        else:
            hi = mid
    return lo, lo_text, lo_used


def _insert_at_depths(units: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Insert each needle at the unit boundary closest to ``depth`` x the haystack's characters
    (so depth is measured in text, not in units of uneven length); ties keep the given order."""
    bounds = [0]
    for unit in units:
        bounds.append(bounds[-1] + len(unit) + 1)
    total = bounds[-1]
    where: list[list[str]] = [[] for _ in range(len(units) + 1)]
    for depth, needle in needles:
        goal = min(max(depth, 0.0), 1.0) * total
        i = min(range(len(bounds)), key=lambda j: (abs(bounds[j] - goal), j))
        where[i].append(needle)
    out: list[str] = []
    for i, unit in enumerate(units):
        out += where[i]
        out.append(unit)
    return out + where[len(units)]


def _needle_depths(rng: random.Random, depth: float | None, count: int) -> list[float]:
    """The first needle (the queried one) at ``depth`` (random when None), the others at random."""
    first = rng.uniform(0.0, 1.0) if depth is None else depth
    return [first] + [rng.uniform(0.0, 1.0) for _ in range(count - 1)]


def _passkey(tokenizer, length: int, rng: random.Random, depth: float | None) -> SyntheticExample:
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.0, 1.0) if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prefix = " The pass key is"

    def build(n: int) -> str:
        before = int(round(depth * n))
        lines = [PASSKEY_INTRO, " ".join([NOISE_SENTENCE] * before), needle,
                 " ".join([NOISE_SENTENCE] * (n - before)), "What is the pass key?"]
        return "\n".join(line for line in lines if line) + prefix

    n, text, used = _fit(tokenizer, build, length, what="passkey", start=max(2, length // 24))
    return SyntheticExample("passkey", text[: -len(prefix)], prefix, [key], used, depth, {"filler_units": n})


def _niah(task: str, tokenizer, length: int, rng: random.Random, depth: float | None, split: str) -> SyntheticExample:
    cfg = NIAH_CONFIGS[task]
    keys: list[str] = []
    while len(keys) < max(cfg.keys, cfg.queries):
        key = _random_value(cfg.key_type, rng)
        if key not in keys:
            keys.append(key)
    values = [[_random_value(cfg.value_type, rng) for _ in range(cfg.values)] for _ in keys]
    queried = list(range(cfg.queries))  # the first keys are asked for; depths put key 0 at ``depth``
    needles = [RULER_NEEDLE.format(type_v=cfg.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    depths = _needle_depths(rng, depth, len(needles))
    query = ", ".join(keys[i] for i in queried[:-1]) + ", and " + keys[queried[-1]] if cfg.queries > 1 else keys[0]
    single = cfg.values * cfg.queries == 1
    type_v = cfg.value_type[:-1] if single else cfg.value_type
    template, prefix = (_NIAH_TEMPLATE_ONE, _NIAH_PREFIX_ONE) if single else (_NIAH_TEMPLATE, _NIAH_PREFIX)
    prefix = prefix.format(type_v=type_v, query=query)

    if cfg.haystack == "essay":
        sentences = essay_sentences(split)
        offset = rng.randrange(len(sentences))

        def units_of(n: int) -> list[str]:  # n words of whole sentences, the last one cut
            out, words, i = [], 0, offset
            while words < n:
                sentence = sentences[i % len(sentences)].split(" ")
                out.append(" ".join(sentence[: n - words]))
                words += len(sentence)
                i += 1
            return out

        sep = " "
    elif cfg.haystack == "noise":
        units_of = lambda n: [NOISE_SENTENCE] * n  # noqa: E731
        sep = "\n"
    else:  # distractor needles with other random keys and values
        hay_rng = random.Random(rng.getrandbits(64))
        pool: list[str] = []

        def units_of(n: int) -> list[str]:
            while len(pool) < n:
                key = _random_value(cfg.key_type, hay_rng)
                if key not in keys:
                    pool.append(RULER_NEEDLE.format(type_v=cfg.value_type, key=key, value=_random_value(cfg.value_type, hay_rng)))
            return pool[:n]

        sep = "\n"

    def build(n: int) -> str:
        context = sep.join(_insert_at_depths(units_of(n), list(zip(depths, needles))))
        return template.format(type_v=type_v, context=context, query=query) + prefix

    n, text, used = _fit(tokenizer, build, length, what=task, start=max(2, length // (2 if cfg.haystack == "essay" else 30)))
    answers = [v for i in queried for v in values[i]]
    return SyntheticExample(task, text[: -len(prefix)], prefix, answers, used, depths[0],
                            {"haystack": cfg.haystack, "units": n, "keys": keys, "query": query})


def _vt_chain(rng: random.Random, hops: int = 4) -> tuple[list[str], str, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(hops)]
    return names, value, chain


def _vt_context(chain: list[str], n: int, first: float, spread: list[float]) -> str:
    """RULER's variable-tracking context: n noise lines with the chain inserted in order; the
    first assignment at depth ``first``, each later one a fraction ``spread[j]`` of the rest."""
    noise = NOISE_SENTENCE + "\n"
    start = int(round(first * n))
    positions = [start] + sorted(start + int(round(f * (n - start))) for f in spread)
    sentences = [noise] * n
    for j, (pos, item) in enumerate(zip(positions, chain)):
        sentences.insert(pos + j, item)
    return " ".join(sentences).replace(". \n", ".\n")


def _vt(tokenizer, length: int, rng: random.Random, depth: float | None) -> SyntheticExample:
    hops = 4
    # one solved example first (RULER's in-context example, with its own names and value)
    icl_names, icl_value, icl_chain = _vt_chain(rng, hops)
    icl_spread = sorted(rng.random() for _ in range(hops))
    icl = (_VT_TEMPLATE.format(context=_vt_context(icl_chain, 5, rng.random() * 0.3, icl_spread), query=icl_value)
           + _VT_PREFIX.format(num_v=hops + 1, query=icl_value) + " ".join(icl_names) + "\n\n")
    names, value, chain = _vt_chain(rng, hops)
    first = rng.uniform(0.0, 1.0) if depth is None else depth
    spread = sorted(rng.random() for _ in range(hops))
    prefix = _VT_PREFIX.format(num_v=hops + 1, query=value)

    def build(n: int) -> str:
        return icl + _VT_TEMPLATE.format(context=_vt_context(chain, n, first, spread), query=value) + prefix

    n, text, used = _fit(tokenizer, build, length, what="vt", start=max(2, length // 24))
    return SyntheticExample("vt", text[: -len(prefix)], prefix, names, used, first, {"noise_units": n, "value": value})


def _cwe(tokenizer, length: int, rng: random.Random) -> SyntheticExample:
    vocab = sorted(set(_word_list("nounlist")) | set(_word_list("adjectivelist")) | set(_word_list("verblist")))
    # RULER: shorter contexts repeat the common words less (6 vs 30) and the others once (vs 3)
    freq_cw, freq_ucw, ex = (6, 1, (20, 3, 1)) if length < 4096 else (30, 3, (40, 10, 3))

    def word_list(words: list[str], n_common: int, f_common: int, f_rare: int, seed: int) -> str:
        items = words[:n_common] * f_common + words[n_common:] * f_rare
        random.Random(seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    ex_words = rng.sample(vocab, ex[0])
    example = (_CWE_TEMPLATE.format(context=word_list(ex_words, 10, ex[1], ex[2], rng.getrandbits(32))) + _CWE_PREFIX
               + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_words[:10])) + "\n")
    words = rng.sample(vocab, min(len(vocab), 10 + length))
    seed = rng.getrandbits(32)

    def build(n: int) -> str:
        if 10 + n > len(words):
            raise ValueError(f"cwe: {length} tokens need more distinct words than the word list has")
        return example + _CWE_TEMPLATE.format(context=word_list(words[: 10 + n], 10, freq_cw, freq_ucw, seed)) + _CWE_PREFIX

    n, text, used = _fit(tokenizer, build, length, what="cwe", start=max(2, length // 40))
    return SyntheticExample("cwe", text[: -len(_CWE_PREFIX)], _CWE_PREFIX, words[:10], used, None, {"rare_words": n})


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi**2 / 6
    n = 100_000  # partial sum plus the integral of the tail
    return sum(k**-alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1)


def _fwe(tokenizer, length: int, rng: random.Random, alpha: float = 2.0) -> SyntheticExample:
    vocab_size = max(10, length // 50)  # RULER: max_seq_length // 50
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        if word not in vocab:
            vocab.append(word)
    vocab[0] = "..."  # the most frequent "word" is noise
    seed = rng.getrandbits(32)
    zeta = _zeta(alpha)

    def build(n: int) -> str:
        items = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k**-alpha / zeta))]
        random.Random(seed).shuffle(items)
        return _FWE_TEMPLATE.format(context=" ".join(items)) + _FWE_PREFIX

    n, text, used = _fit(tokenizer, build, length, what="fwe", start=max(2, length // 3))
    return SyntheticExample("fwe", text[: -len(_FWE_PREFIX)], _FWE_PREFIX, vocab[1:4], used, None, {"words": n})


def make_synthetic_example(task: str, tokenizer, length: int, rng: random.Random, *, depth: float | None = None,
                           split: str = "all") -> SyntheticExample:
    """One evaluation prompt of ``task`` (one of ``SYNTHETIC_TASKS``) whose ``input +
    answer_prefix`` is as close to ``length`` tokens of ``tokenizer`` as the haystack's
    granularity allows, never longer.

    depth in [0, 1] places the (queried) needle for the tasks in ``DEPTH_TASKS`` (random when
    None); ``split`` chooses the essays of the essay haystacks ("all", "train", "heldout")."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {SYNTHETIC_TASKS}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    if task == "passkey":
        return _passkey(tokenizer, length, rng, depth)
    if task in NIAH_CONFIGS:
        return _niah(task, tokenizer, length, rng, depth, split)
    if task == "vt":
        return _vt(tokenizer, length, rng, depth)
    if task == "cwe":
        return _cwe(tokenizer, length, rng)
    return _fwe(tokenizer, length, rng)
