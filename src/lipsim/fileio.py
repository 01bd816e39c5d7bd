"""Atomic file writes, shared by every writer in lipsim (models, training runs, caches, indexes).

A file is written under a temporary name in its own folder and renamed over the target, so a
reader (or a resumed run) sees either the old file or the complete new one, never a torn write,
whatever interrupts the writer. The file gets the permissions a plain ``open()`` would give
(``0666`` less the umask), not the ``0600`` of ``mkstemp``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_text_atomic", "write_npy_atomic", "current_umask"]


def current_umask() -> int:
    """The process's umask now (read from /proc where there is one: setting and restoring it, the
    portable way, would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(tmp_path)`` to fill a temporary file beside ``path``, then renames it onto
    ``path``. The parent folder is created; on any failure (or interrupt) the temporary file is
    removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # after writing: a writer may replace the file it was given (safetensors does, with a
        # fresh 0600 file), and the umask is read now, not when lipsim was imported
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_npy_atomic(path: str | os.PathLike, array) -> None:
    """Saves ``array`` as a ``.npy`` file at ``path`` through :func:`atomic_write`."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)
