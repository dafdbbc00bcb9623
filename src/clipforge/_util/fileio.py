"""Atomic file writes (a long job killed at any moment never leaves a half-written file behind), and file names
as printable text."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_file_mode() -> int:
    """``0o666`` minus the process umask: what ``open(path, "w")`` would have created."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a non-UTF-8 file name (Python's surrogate escapes) written ``\\xNN``,
    so it can be printed or stored as UTF-8; any other text is returned unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
