"""Feeding inputs of any length through a model with constant memory, and the one decode path.

``ingest`` reads tokens into a cache ``segment`` tokens at a time. ``continue_text`` reads a
prompt that way and then generates with transformers' ``generate``: chat sessions, ``allmem
generate`` and the evaluated systems all decode through it, so end tokens, stop strings,
sampling and streamed text mean the same everywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm
from transformers import Cache, PreTrainedModel, TextStreamer

from .compat import cache_kwargs

# end-of-turn markers of the chat templates we know (ChatML, Llama 3, Gemma): a reply ends at
# them even where the generation config names only the end-of-text token
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def resident_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


@torch.no_grad()
def ingest(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache | None = None,
    *,
    segment: int = 1024,
    progress: bool = True,
    on_segment: Callable[[int, Cache], None] | None = None,
) -> Cache:
    """Run ``input_ids`` [B, L] through the model ``segment`` tokens at a time into ``cache``
    (default: a new ``AllMemCache``; any transformers ``Cache`` works, e.g. the full-attention
    baseline's ``DynamicCache``).

    For an AllMem model, work and memory per segment are O(segment x (W + S)) whatever L is;
    only the logits of the last position are computed. The progress bar shows tokens/s, the
    cache's bytes and the process's resident memory, which stay flat.
    """
    if segment <= 0:
        raise ValueError(f"segment must be a positive number of tokens, got {segment}")
    cache = cache if cache is not None else model.new_cache()
    total = input_ids.shape[1]
    bar = tqdm(total=total, unit="tok", desc="ingest", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    for begin in range(0, total, segment):
        piece = input_ids[:, begin : begin + segment]
        model(piece, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)  # any model's cache argument
        bar.update(piece.shape[1])
        sizes = {"cache": f"{cache.nbytes() / 2**20:.1f}MiB"} if hasattr(cache, "nbytes") else {}
        bar.set_postfix(**sizes, rss=f"{resident_mib():.0f}MiB",
                        tok_s=f"{(begin + piece.shape[1]) / (time.perf_counter() - start):.0f}")
        if on_segment is not None:
            on_segment(begin + piece.shape[1], cache)
    bar.close()
    return cache


# ------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: greedy at temperature 0 (the default), else drawn from
    the temperature-scaled distribution cut to its ``top_k`` tokens (0: all of them) and its
    ``top_p`` nucleus. Draws use torch's global generator: ``torch.manual_seed`` repeats them."""

    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no cut), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            # explicit Nones override sampling defaults a generation config may carry
            return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


GREEDY = Sampling()


@dataclass(frozen=True)
class Continuation:
    text: str  # special tokens skipped, cut before the first stop string
    token_ids: list[int]  # every generated token, a final end token included
    ended: bool  # the last token is an end token (never fed into the cache)


def end_token_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """The tokens that end a continuation: the generation config's and the tokenizer's end of
    text, and the chat end-of-turn markers the vocabulary has."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(int(t) for t in ids)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop or ():
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _TextPieces(TextStreamer):
    """transformers' ``TextStreamer`` (pieces end at word boundaries; an incomplete character
    waits) handing its text to ``on_text`` instead of printing it. Text that could begin a stop
    string is held back until it cannot, and nothing from a stop string on is handed over, so
    the pieces join to exactly the continuation's text."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None], stop: Sequence[str]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text, self.stop = on_text, [s for s in stop if s]
        self.hold = max(map(len, self.stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.text += text
        upto = len(cut_at_stop(self.text, self.stop))
        if upto < len(self.text):
            self.stopped = True
        elif not stream_end:
            upto = max(self.sent, len(self.text) - self.hold)
        if upto > self.sent:
            self.on_text(self.text[self.sent : upto])
            self.sent = upto


@torch.no_grad()
def continue_text(
    model: PreTrainedModel,
    tokenizer: Any,
    new_ids: torch.Tensor,
    cache: Cache,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_strings: Sequence[str] = (),
    segment: int = 1024,
    progress: bool = False,
    on_text: Callable[[str], None] | None = None,
    feed_last: bool = False,
) -> Continuation:
    """Read ``new_ids`` [1, n] into ``cache`` after what it holds, then generate.

    All but the last prompt token go in ``segment`` tokens at a time (``ingest``); the last one
    starts transformers' ``generate``. Generation ends at an end token (``end_token_ids``), at
    the token that completes one of ``stop_strings`` (transformers' ``StopStringCriteria``) or
    after ``max_new_tokens``. ``on_text`` receives the text as it is generated. The returned
    text is cut before the first stop string.

    ``generate`` never feeds its last token to the model; ``feed_last`` does (unless it is an
    end token), so that a conversation's state holds the whole reply.
    """
    if new_ids.dim() != 2 or new_ids.shape[0] != 1 or new_ids.shape[1] == 0:
        raise ValueError(f"continue_text reads one non-empty row of token ids [1, n], got shape {tuple(new_ids.shape)}")
    if max_new_tokens <= 0:
        ingest(model, new_ids, cache, segment=segment, progress=progress)
        return Continuation("", [], False)
    if new_ids.shape[1] > 1:
        ingest(model, new_ids[:, :-1], cache, segment=segment, progress=progress)
    past = cache.get_seq_length()
    last = new_ids[:, -1:]
    ends = end_token_ids(model, tokenizer)
    stop = [s for s in stop_strings if s]
    out = model.generate(
        last,
        **cache_kwargs(cache),
        # transformers reads a cache being continued as holding the attention mask's length
        # minus the new tokens; with a mask of the new tokens only, it would skip them
        attention_mask=torch.ones(1, past + 1, dtype=torch.long, device=last.device),
        # the last token's position; left to generate, it would be built from the whole mask
        position_ids=torch.full((1, 1), past, dtype=torch.long, device=last.device),
        max_new_tokens=max_new_tokens,
        eos_token_id=ends or None,
        pad_token_id=ends[0] if ends else None,
        stop_strings=stop or None,
        tokenizer=tokenizer if stop else None,
        streamer=_TextPieces(tokenizer, on_text, stop) if on_text is not None else None,
        **sampling.generate_kwargs(),
    )
    new = out[0, 1:].tolist()
    ended = bool(new) and new[-1] in ends
    if feed_last and new and not ended:
        model(out[:, -1:], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    text = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True)
    return Continuation(cut_at_stop(text, stop), new, ended)
