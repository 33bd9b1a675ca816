"""Training data for distillation: local chat/text files, the built-in long-context corpus,
formatting with the base model's chat template, response-only masks and batching.

Every sample is (input_ids, loss_mask): loss_mask marks the tokens whose prediction is
scored (assistant turns for chat data, every token for plain text).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..corpus import documents
from .tasks import TASKS, make_example


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]
    source: str
    ce_weight: float | None = None
    """Weight of the cross-entropy term for this sample (None: the recipe's lambda_ce); a
    recall task's known answer makes CE a direct signal where the teacher is weak."""
    write_mask: list[int] | None = None
    """1 on the context tokens that state the answer or another candidate fact (a recall task's
    needles), 0 elsewhere; None where nothing is known. The write-gate loss (``train.lambda_gate``,
    ours) reads it."""

    def __len__(self) -> int:
        return len(self.input_ids)


class DataError(ValueError):
    """A data file is malformed; the message names the file, the line and the field."""


# ------------------------------------------------------------------ records
def read_records(path: str | Path) -> Iterator[tuple[int, dict | str]]:
    """(line number, record) from a .jsonl file, or (1, text) from a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix not in (".jsonl", ".json"):
        yield 1, path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


_CHAT_ROLES = ("system", "user", "assistant", "tool")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "model": "assistant", "bot": "assistant"}


def to_messages(record: dict | str, where: str) -> list[dict] | str:
    """Normalise the common shapes: messages (role/content), ShareGPT conversations
    (from/value), prompt/response pairs, {"text": ...} or a plain string (-> text)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in _CHAT_ROLES:
                raise DataError(f"{where}: messages[{i}].role = {m['role']!r} is not one of {list(_CHAT_ROLES)}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "conversations" in record:
        out = []
        for i, m in enumerate(record["conversations"]):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
            role = _ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{i}].from = {m['from']!r} is not one of {sorted(_ROLES)}")
            out.append({"role": role, "content": m["value"]})
        return out
    if "prompt" in record and "response" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    if "text" in record:
        return str(record["text"])
    raise DataError(f"{where}: no 'messages', 'conversations', 'prompt'+'response' or 'text' field (keys: {sorted(record)})")


# --------------------------------------------------------------- formatting
def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def chat_sample(tokenizer, messages: list[dict], max_len: int, source: str = "chat") -> Sample:
    """Format with the model's own chat template; only assistant tokens are scored.

    Each assistant turn's span is found by rendering the conversation up to the turn with
    the generation prompt, then including the turn: the tokens in between are the turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use plain text data or a chat model")
    ids = _template_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_template_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        mask[start:end] = [1] * (end - start)
    return _fit(Sample(ids, mask, source), max_len)


def text_sample(tokenizer, text: str, max_len: int, source: str = "text") -> Sample:
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_len]
    return Sample(ids, [1] * len(ids), source)


def _fit(sample: Sample, max_len: int) -> Sample:
    """Cut an over-long sample in the middle of its context, keeping the head (template,
    instructions) and the tail (question and response)."""
    if len(sample) <= max_len:
        return sample
    head = min(64, max_len // 4)
    tail = max_len - head
    return Sample(sample.input_ids[:head] + sample.input_ids[-tail:], sample.loss_mask[:head] + sample.loss_mask[-tail:],
                  sample.source)


# ------------------------------------------------------------------ corpora
def task_samples(tokenizer, count: int, lengths: tuple[int, int], *, seed: int, split: str,
                 tasks: tuple[str, ...] = TASKS, write_marks: str = "facts") -> list[Sample]:
    """The built-in corpus: long-context tasks as chat turns with ground-truth answers.

    ``write_marks`` picks the context tokens a sample's write mask marks for the write-gate loss:
    ``facts``, every stated candidate answer (the distractor needles too); ``answer``, only the
    asked one (the masks runs v9 and v10 trained with)."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        length = rng.randint(*lengths)
        ex = make_example(task, tokenizer, length, rng, split=split)
        messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer.strip()}]
        sample = chat_sample(tokenizer, messages, length + 128, source=f"task/{task}")
        # every stated fact by default: the gate cannot know which of several needles the question will ask
        facts = ", ".join(ex.meta.get("facts", [])) if write_marks == "facts" else ""
        sample.write_mask = answer_in_context(tokenizer, sample, facts or ex.answer)
        out.append(sample)
    return out


def digit_token_ids(tokenizer) -> dict[int, int]:
    """Token id -> digit, for the tokenizer's single-digit tokens (SmolLM2, Llama 3, Qwen: every digit
    is its own token)."""
    ids = {}
    for digit in range(10):
        encoded = tokenizer(str(digit), add_special_tokens=False).input_ids
        if len(encoded) == 1:
            ids[encoded[0]] = digit
    return ids


def counterfactual_ids(sample: Sample, digits: dict[int, int]) -> list[int] | None:
    """(ours) The sample with another code in its needles: every digit token under its write mask
    (``answer_in_context``) becomes (d + 5) % 10, the rest (the question, the scored answer) unchanged;
    None when the mask holds no digit token (a word answer) or the sample has no mask."""
    if not sample.write_mask:
        return None
    by_digit = {d: t for t, d in digits.items()}
    ids = list(sample.input_ids)
    changed = False
    for i, marked in enumerate(sample.write_mask):
        if marked and ids[i] in digits and (digits[ids[i]] + 5) % 10 in by_digit:
            ids[i] = by_digit[(digits[ids[i]] + 5) % 10]
            changed = True
    return ids if changed else None


def answer_in_context(tokenizer, sample: Sample, answer: str) -> list[int] | None:
    """A mask [T] of 1s on every place in the sample's context (the unscored tokens) where the
    answer's tokens appear (each part of a comma-separated answer), with or without a leading
    space; None if they appear nowhere (a tokenizer that merges them with their neighbours, or an
    answer the context only implies)."""
    parts = [part.strip() for part in answer.strip().rstrip(".").split(",") if part.strip()]
    ids, mask = sample.input_ids, [0] * len(sample)
    for text in (prefix + part for part in parts for prefix in ("", " ")):
        needle = tokenizer(text, add_special_tokens=False).input_ids
        n = len(needle)
        for start in range(len(ids) - n + 1):
            span = range(start, start + n)
            if ids[start:start + n] == needle and not any(sample.loss_mask[i] for i in span):
                mask[start:start + n] = [1] * n
    return mask if any(mask) else None


def document_samples(tokenizer, count: int, lengths: tuple[int, int], *, seed: int, split: str,
                     sources: tuple[str, ...] | None = None) -> list[Sample]:
    """Plain long text of the split, every token scored.

    Without ``sources``: one shuffled stream of pydoc + essays ("text/corpus", the shipped
    adapter's recipe). With ``sources`` (names from ``corpus.TEXT_SOURCES``): each sample
    draws its source uniformly and is labelled ``text/<source>`` for per-source curves.
    """
    rng = random.Random(f"{seed}-{split}-docs")

    def stream_of(names: tuple[str, ...]) -> list[int]:
        docs = documents(split, names)
        return tokenizer("\n\n".join(d.text for d in rng.sample(docs, len(docs))), add_special_tokens=False).input_ids

    streams = {"corpus": stream_of(("pydoc", "essays"))} if sources is None else {n: stream_of((n,)) for n in sources}
    names = list(streams)
    out = []
    for _ in range(count):
        name = rng.choice(names)
        stream = streams[name]
        length = rng.randint(*lengths)
        start = rng.randrange(0, max(1, len(stream) - length))
        ids = stream[start : start + length]
        out.append(Sample(ids, [1] * len(ids), f"text/{name}"))
    return out


def file_samples(tokenizer, path: str | Path, max_len: int, limit: int | None = None) -> list[Sample]:
    out = []
    for lineno, record in read_records(path):
        item = to_messages(record, f"{path}:{lineno}")
        if isinstance(item, str):
            out.append(text_sample(tokenizer, item, max_len, source=f"file/{Path(path).name}"))
        else:
            if not any(m["role"] == "assistant" for m in item):
                raise DataError(f"{path}:{lineno}: no assistant turn, so nothing to train on "
                                "(chat data is scored on the assistant's replies; give plain text as {\"text\": ...})")
            out.append(chat_sample(tokenizer, item, max_len, source=f"file/{Path(path).name}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no records (the file is empty); give at least one chat or text record")
    return out


# ------------------------------------------------------------------ batching
def length_grouped_batches(samples: list[Sample], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then group similar lengths into batches (less padding), then shuffle batches.

    Samples are never packed together: each row of a batch is one sample, padded on the
    right, so no memory state or attention crosses samples.
    """
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    window = batch_size * 16
    grouped = []
    for i in range(0, len(order), window):
        grouped += sorted(order[i : i + window], key=lambda j: len(samples[j]))
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(samples: list[Sample], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, loss_mask [B, T]."""
    import torch

    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(s.loss_mask)
    return ids, attn, mask
