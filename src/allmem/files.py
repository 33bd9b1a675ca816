"""Files the package writes and checks: permissions of atomic writes, their temp files, SHA-256.

Atomic writes go through ``tempfile`` (``mkstemp`` files are 0600, ``mkdtemp`` directories
0700) and safetensors writes 0600 files; moved into place as they are, a user's adapters,
states and checkpoints would be unreadable to the group and others that a plain ``open``
would let read them. These give them the permissions the user's umask would have.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
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


# (path, size, mtime_ns) -> SHA-256: each file is hashed once per process, again only if it changed
_SHA256_SEEN: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (as ``sha256sum`` prints it), read in 1 MiB blocks."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_SEEN:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256_SEEN[key] = h.hexdigest()
    return _SHA256_SEEN[key]


# Temp files of atomic writes carry the writer's PID, so that the next writer of the same
# name can tell the leftovers of a killed save (its process is gone) from a save that is
# still running in another process, and remove only the former.
def temp_prefix(name: str) -> str:
    """The ``tempfile`` prefix for an atomic write of ``name``: ``.{name}.{pid}.``"""
    return f".{name}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, name: str) -> list[Path]:
    """Delete what killed atomic writes of ``name`` left in ``directory`` (files or folders made
    with ``temp_prefix(name)`` by a process that no longer runs); returns what was removed."""
    removed = []
    for path in Path(directory).glob(f".{glob.escape(name)}.*.*"):
        pid = path.name[len(name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new temp folder in ``parent`` for an atomic write of ``name`` (renamed into place by
    the caller), after removing what killed writes of ``name`` left there."""
    remove_stale_temps(parent, name)
    return Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix(name)))


def atomic_temp_file(parent: str | os.PathLike, name: str) -> Path:
    """A new empty temp file in ``parent`` for an atomic write of ``name``; as ``atomic_temp_dir``."""
    remove_stale_temps(parent, name)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=temp_prefix(name))
    os.close(fd)
    return Path(tmp)
