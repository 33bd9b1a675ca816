"""Long real text that every Python install has: ``pydoc_data.topics`` (about 110k SmolLM2 tokens)."""

from __future__ import annotations


def long_document() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))
