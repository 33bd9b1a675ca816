"""File permissions for what the package writes atomically.

Atomic writes go through ``tempfile`` (``mkstemp`` files are 0600, ``mkdtemp`` directories
0700) and safetensors writes 0600 files; moved into place as they are, a user's adapters,
states and checkpoints would be unreadable to the group and others that a plain ``open``
would let read them. These give them the permissions the user's umask would have.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike) -> None:
    """chmod ``path`` like ``open``/``mkdir`` would have created it; for a directory, also the
    files directly inside it."""
    path, mask = Path(path), _umask()
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        for child in path.iterdir():
            if child.is_file():
                child.chmod(0o666 & ~mask)
    elif path.is_file():
        path.chmod(0o666 & ~mask)
