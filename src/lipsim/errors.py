"""Exceptions with one-line messages; the command line prints them without a traceback."""

from __future__ import annotations

__all__ = ["LipSimError", "ImageError", "CheckpointError", "one_line"]


def one_line(exc: BaseException, limit: int | None = 200, empty: str | None = None) -> str:
    """The first line of ``exc``'s message, stripped and cut to ``limit`` characters (``None``:
    not cut), for a one-line error built from an exception raised by a library (NumPy, torch,
    Pillow, FAISS...) or for printing one. An empty message gives ``empty``, by default the
    exception's type name."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0][:limit]


class LipSimError(Exception):
    """Base class for errors that carry a one-line, user-facing message."""


class ImageError(LipSimError, ValueError):
    """An image file or tensor that cannot be used (missing, corrupt, wrong range...)."""


class CheckpointError(LipSimError, ValueError):
    """A model file that cannot be loaded safely (unknown format, unsafe pickle, wrong shapes)."""
