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

__all__ = ["atomic_write", "write_text_atomic", "write_npy_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls ``write(tmp_path)`` to fill a temporary file beside ``path``, then renames it onto
    ``path``. The parent folder is created; on any failure (or interrupt) the temporary file is
    removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
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
