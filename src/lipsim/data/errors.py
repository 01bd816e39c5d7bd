"""The error every dataset loader raises for a layout it cannot use."""

from __future__ import annotations

from ..errors import LipSimError

__all__ = ["DatasetError"]


class DatasetError(LipSimError, ValueError):
    """A dataset folder that cannot be read: missing index file, columns, images, or an empty split.

    The message is one line and names the offending file, column or split.
    """
