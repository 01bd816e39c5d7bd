"""Exceptions with one-line messages; the command line prints them without a traceback."""

from __future__ import annotations

__all__ = ["LipSimError", "ImageError", "CheckpointError"]


class LipSimError(Exception):
    """Base class for errors that carry a one-line, user-facing message."""


class ImageError(LipSimError, ValueError):
    """An image file or tensor that cannot be used (missing, corrupt, wrong range...)."""


class CheckpointError(LipSimError, ValueError):
    """A model file that cannot be loaded safely (unknown format, unsafe pickle, wrong shapes)."""
