"""Fixtures of the evaluation tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eval_fakes import FIXTURES


@pytest.fixture
def data_copy(tmp_path: Path):
    """A writable copy of one fixture folder, for tests that break files."""

    def copy(name: str) -> Path:
        target = tmp_path / "data" / name
        shutil.copytree(FIXTURES / name, target)
        return target

    return copy
