"""Fakes for the runner tests: tokenizers with predictable cuts and a scripted model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
BOS = -1


class CharTokenizer:
    """One token per character; optionally a BOS token that ``skip_special_tokens`` drops.

    With characters as tokens, the expected truncation of any prompt can be written down.
    """

    def __init__(self, bos: bool = False):
        self.bos = bos

    def encode(self, text: str) -> list[int]:
        return ([BOS] if self.bos else []) + [ord(ch) for ch in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(
            "<s>" if t == BOS else chr(t)
            for t in token_ids
            if not (skip_special_tokens and t == BOS)
        )


class WordTokenizer:
    """Whitespace words as tokens, decoded joined by single spaces.

    Decoding two halves separately and concatenating loses the space at the cut, which tells
    LongBench's truncation (halves decoded apart) from InfiniteBench's (joined list decoded).
    """

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.words[t] for t in token_ids)


class ScriptedModel:
    """``generate_fn`` that answers by the unique marker (e.g. "[hp-1]") found in the prompt.

    Records every call, so tests can assert prompts, budgets and that a resumed run generates
    nothing.
    """

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def __call__(self, prompt: str, max_new_tokens: int) -> str:
        self.calls.append((prompt, max_new_tokens))
        for marker, answer in self.answers.items():
            if marker in prompt:
                return answer
        return "I do not know."

    def budget_for(self, marker: str) -> int:
        return next(budget for prompt, budget in self.calls if marker in prompt)

    def prompt_for(self, marker: str) -> str:
        return next(prompt for prompt, _ in self.calls if marker in prompt)


def chat(prompt: str) -> str:
    return f"<user>{prompt}</user><assistant>"
