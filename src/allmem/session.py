"""A conversation or a read document held in one constant-size state, saved and resumed exactly.

A ``Session`` owns an ``AllMemCache`` and knows where in the chat template it stands:

- ``new``: nothing read yet;
- ``open``: inside a user turn (``read`` put a document there; the next question joins it);
- ``closed``: after an assistant reply.

Turns are rendered with the tokenizer's own chat template, piece by piece, so no history
of text or token ids is kept: only the cache and a few numbers. ``save`` writes the cache and
the session's position (plus the identity of the model) into one safetensors file;
``Session.load`` continues exactly where the saved one stopped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import AllMemCache
from .modeling import AllMemForCausalLM
from .streaming import GREEDY, Sampling, continue_text, ingest

SESSION_FORMAT = "allmem-session/1"
_MARK_A, _MARK_B, _MARK_X = "\x00A\x00", "\x00B\x00", "\x00X\x00"
READ_BLOCK_CHARS = 1 << 16  # text read from a file per tokenizer call


class SessionError(ValueError):
    """A saved session does not fit the model it is resumed with."""


@dataclass(frozen=True)
class TurnTemplate:
    """The text around a user message: for the first turn (system prompt included) and for
    any later turn (which also closes the previous assistant reply)."""

    first_prefix: str
    next_prefix: str
    suffix: str  # end of the user turn + the assistant header

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TurnTemplate":
        if not getattr(tokenizer, "chat_template", None):
            return cls("", "\n\n", "\n")  # plain text model: questions and answers as paragraphs

        def render(messages, generation):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

        one = render([{"role": "user", "content": _MARK_X}], True)
        first_prefix, suffix = one.split(_MARK_X)
        history = [{"role": "user", "content": _MARK_A}, {"role": "assistant", "content": _MARK_B}]
        closed = render(history, False)
        longer = render([*history, {"role": "user", "content": _MARK_X}], True)
        if not longer.startswith(closed.split(_MARK_B)[0] + _MARK_B):
            raise ValueError("the chat template does not render turns incrementally; sessions need one that does")
        after_reply = longer.split(_MARK_B, 1)[1]
        next_prefix, next_suffix = after_reply.split(_MARK_X)
        if next_suffix != suffix:
            raise ValueError("the chat template closes the first and later user turns differently")
        return cls(first_prefix, next_prefix, suffix)


def model_fingerprint(model: AllMemForCausalLM) -> str:
    """A short hash of the base signature, the config and the adapter weights: a saved
    session only resumes on the model that wrote it."""
    cached = getattr(model, "_allmem_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(repr((model._signature, model.allmem_config.to_dict())).encode())
    for name, p in sorted(model.memory_parameters().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    object.__setattr__(model, "_allmem_fingerprint", h.hexdigest()[:16])
    return model._allmem_fingerprint


def iter_text_blocks(path: str | os.PathLike, block_chars: int = READ_BLOCK_CHARS) -> Iterator[str]:
    """A text file in pieces of about ``block_chars`` characters, cut after a newline (or a
    space) where possible, so a file of any size is never held in memory whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    carry = ""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        while True:
            data = f.read(block_chars)
            if not data:
                break
            text = carry + data
            cut = max(text.rfind("\n"), text.rfind(" "))
            if cut <= 0:
                cut = len(text) - 1
            yield text[: cut + 1]
            carry = text[cut + 1 :]
    if carry:
        yield carry


class Session:
    """One conversation (or read document) in a constant-size state."""

    def __init__(self, model: AllMemForCausalLM, tokenizer, *, segment: int = 1024):
        self.model, self.tokenizer, self.segment = model, tokenizer, segment
        self.template = TurnTemplate.from_tokenizer(tokenizer)
        self.cache: AllMemCache = model.new_cache()
        self.phase = "new"
        self.turns = 0
        self.tokens_read = 0
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------ feeding
    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(self._device)

    def _feed(self, text: str, *, progress: bool = False, on_segment=None) -> None:
        ids = self._ids(text)
        if ids.shape[1] == 0:
            return
        self.tokens_read += ids.shape[1]
        ingest(self.model, ids, self.cache, segment=self.segment, progress=progress, on_segment=on_segment)

    def read(self, text: str, *, progress: bool = False, on_segment=None) -> None:
        """Put ``text`` into the current user turn (opening one if needed). ``on_segment(done,
        cache)`` is called after every segment of ``text`` (see ``streaming.ingest``)."""
        if self.phase != "open":
            self._feed(self.template.first_prefix if self.phase == "new" else self.template.next_prefix)
            self.phase = "open"
        self._feed(text, progress=progress, on_segment=on_segment)

    def read_file(self, path: str | os.PathLike, *, progress: bool = True) -> int:
        """Stream a text file of any length into the current user turn; returns its token count."""
        from tqdm.auto import tqdm

        from .streaming import resident_mib

        before = self.tokens_read
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"read {Path(path).name}", disable=not progress,
                   dynamic_ncols=True)
        for block in iter_text_blocks(path):
            self.read(block)
            bar.update(len(block.encode("utf-8", errors="replace")))
            bar.set_postfix(tokens=self.tokens_read - before, cache=f"{self.cache.nbytes() / 2**20:.1f}MiB",
                            rss=f"{resident_mib():.0f}MiB")
        bar.close()
        return self.tokens_read - before

    def ask(self, message: str, *, max_new_tokens: int = 128, sampling: Sampling = GREEDY,
            stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message and return the reply (cut before the first of ``stop``);
        ``on_text`` receives it piece by piece as it is generated. Every generated token but an
        end-of-turn one is fed back into the state, so the next turn continues from the reply;
        the end of turn comes from the next turn's template text."""
        if self.phase == "open":
            text = "\n\n" + message + self.template.suffix
        else:
            prefix = self.template.first_prefix if self.phase == "new" else self.template.next_prefix
            text = prefix + message + self.template.suffix
        ids = self._ids(text)
        self.phase = "closed"
        self.turns += 1
        reply = continue_text(self.model, self.tokenizer, ids, self.cache, max_new_tokens=max_new_tokens,
                              sampling=sampling, stop_strings=stop, segment=self.segment, on_text=on_text,
                              feed_last=True)
        self.tokens_read += ids.shape[1] + len(reply.token_ids) - reply.ended
        return reply.text

    # ------------------------------------------------------- save / resume
    def save(self, path: str | os.PathLike) -> None:
        """The whole session as one safetensors file, written atomically."""
        self.cache.save(path, metadata={"session": SESSION_FORMAT, "phase": self.phase, "turns": self.turns,
                                        "tokens_read": self.tokens_read, "model": model_fingerprint(self.model)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: AllMemForCausalLM, tokenizer, *, segment: int = 1024) -> "Session":
        """Resume the session saved at ``path``; a damaged file raises ``cache.CacheFileError``."""
        return cls.resume(AllMemCache.load(path), path, model, tokenizer, segment=segment)

    @classmethod
    def resume(cls, cache: AllMemCache, path: str | os.PathLike, model: AllMemForCausalLM, tokenizer, *,
               segment: int = 1024) -> "Session":
        """A session from a state already read from ``path`` (the CLI reads and checks the file
        before the model loads, so a bad --session fails fast)."""
        cache._map(lambda t: t.to(next(model.parameters()).device))
        meta = getattr(cache, "metadata", {})
        if meta.get("session") != SESSION_FORMAT:
            raise SessionError(f"{path} is an AllMem state but not a session file (save one with `allmem chat --session`"
                               " or `allmem read`)")
        if meta.get("model") != model_fingerprint(model):
            raise SessionError(f"{path} was written by another model or adapter than the one loaded; "
                               "resume it with the --model it was made with")
        c = model.allmem_config
        if (cache.window, cache.sinks, cache.chunk) != (c.window, c.sinks, c.chunk):
            raise SessionError(f"{path} was saved with window/sinks/chunk {cache.window}/{cache.sinks}/{cache.chunk}, "
                               f"the model runs {c.window}/{c.sinks}/{c.chunk}")
        if meta.get("phase") not in ("new", "open", "closed") or not all(
                str(meta.get(k, "")).isdigit() for k in ("turns", "tokens_read")):
            raise SessionError(f"{path} has incomplete session metadata (phase, turns, tokens_read); it cannot be resumed")
        session = cls(model, tokenizer, segment=segment)
        session.cache, session.phase = cache, meta["phase"]
        session.turns, session.tokens_read = int(meta["turns"]), int(meta["tokens_read"])
        return session

