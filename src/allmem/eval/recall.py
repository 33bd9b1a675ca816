"""The recall margin: does a model carry *specific* information about a fact far back?

    margin = log p(right answer | prompt) - log p(wrong answer of the same form | prompt)

summed over the answer tokens. Exact-match accuracy only moves once the right answer wins
the argmax at every token; the margin is continuous and low-noise, so it shows progress
(or its absence) long before accuracy does. A model that cannot see the fact has a margin
near 0 (it has no reason to prefer one 5-digit code over another); full attention on a
1k-token passkey prompt has about +15 nats.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# forward(ids [1, T], keep) -> logits [1, keep, V] of the last ``keep`` positions
LogitsFn = Callable[[torch.Tensor, int], torch.Tensor]
# (prompt ids, answer ids) -> log p(answer | prompt), summed over the answer tokens
LogProbFn = Callable[[Sequence[int], Sequence[int]], float]


def corrupt_answer(answer: str, rng: random.Random) -> str:
    """The same answer with every digit replaced by a different digit (same form, same
    token count for digit-per-token tokenizers); raises if the answer has no digit."""
    if not any(c.isdigit() for c in answer):
        raise ValueError(f"the recall margin needs an answer with digits, got {answer!r}")
    return "".join(str((int(c) + rng.randint(1, 9)) % 10) if c.isdigit() else c for c in answer)


@torch.no_grad()
def answer_logprob(logits_fn: LogitsFn, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
    """Sum of log p(answer token | everything before it), from one forward of prompt + answer."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    logits = logits_fn(ids, len(answer_ids) + 1)[0, :-1].float()  # positions predicting the answer
    logp = F.log_softmax(logits, dim=-1)
    return float(logp.gather(1, torch.tensor(answer_ids)[:, None]).sum())


@dataclass
class MarginResult:
    margins: list[float]

    @property
    def mean(self) -> float:
        return sum(self.margins) / max(1, len(self.margins))

    @property
    def wins(self) -> float:
        """Share of prompts where the right answer is more likely than the wrong one."""
        return sum(m > 0 for m in self.margins) / max(1, len(self.margins))


def logits_logprob_fn(logits_fn: LogitsFn) -> LogProbFn:
    """log p(answer | prompt) from one model forward of prompt + answer."""
    return lambda prompt, answer: answer_logprob(logits_fn, prompt, answer)


def system_logprob_fn(system) -> LogProbFn:
    """log p(answer | prompt) from an evaluation system's segment-wise token NLLs
    (``allmem.eval.systems.System``: full attention, SWA + sinks or AllMem alike)."""
    return lambda prompt, answer: -float(system.token_nlls(list(prompt) + list(answer))[-len(answer):].sum())


def recall_margins(logprob_fn: LogProbFn, items: Sequence[tuple[list[int], list[int], list[int]]]) -> MarginResult:
    """items: (prompt ids, right answer ids, wrong answer ids) -> margins in nats."""
    margins = []
    for prompt, right, wrong in items:
        if len(right) != len(wrong):
            raise ValueError("the right and wrong answers must have the same number of tokens")
        margins.append(logprob_fn(prompt, right) - logprob_fn(prompt, wrong))
    return MarginResult(margins)


def answer_token_pair(tokenizer, answer: str, rng: random.Random, tries: int = 10) -> tuple[list[int], list[int]] | None:
    """Token ids of ``answer`` and of a corrupted answer with as many tokens (a digit merge in
    the tokenizer can change the count; then another corruption is drawn), or None."""
    right = list(tokenizer(answer, add_special_tokens=False).input_ids)
    for _ in range(tries):
        wrong = list(tokenizer(corrupt_answer(answer, rng), add_special_tokens=False).input_ids)
        if len(wrong) == len(right):
            return right, wrong
    return None


def margin_items(tokenizer, examples, seed: int = 0, chat: bool = True) -> list[tuple[list[int], list[int], list[int]]]:
    """Token ids for ``recall_margins`` from task examples (``.prompt`` and ``.answer``),
    with the prompt in the model's chat template (assistant turn opened) when ``chat``."""
    rng = random.Random(seed)
    items = []
    for ex in examples:
        answer = ex.answer.rstrip(".")
        if chat and getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
            answer = answer.lstrip()
        else:
            prompt = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        pair = answer_token_pair(tokenizer, answer, rng)
        if pair is not None:
            items.append((list(prompt), *pair))
    return items


def allmem_logits_fn(model) -> LogitsFn:
    return lambda ids, keep: model(ids, use_cache=False, logits_to_keep=keep).logits


def swa_logits_fn(model) -> LogitsFn:
    """The same model with the memory off: SWA + sinks."""

    def run(ids: torch.Tensor, keep: int) -> torch.Tensor:
        with model.memory_disabled():
            return allmem_logits_fn(model)(ids, keep)

    return run


def full_attention_logits_fn(model) -> LogitsFn:
    """The original full-attention model inside an AllMem model (its pretrained attention)."""

    def run(ids: torch.Tensor, keep: int) -> torch.Tensor:
        with model.original_attention() as base:
            return base(ids, logits_to_keep=keep).logits

    return run
