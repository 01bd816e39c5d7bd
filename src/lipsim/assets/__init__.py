"""The photos bundled with lipsim (see CREDITS.md): offline examples for the README and the demo.

``lipsim.assets.path("cat_a.jpg")`` is the file's path; ``names()`` lists them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["path", "names"]

_SUFFIXES = (".jpg", ".jpeg", ".png")


def names() -> list[str]:
    """The bundled image files, sorted."""
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.name.lower().endswith(_SUFFIXES))


def path(name: str) -> Path:
    """The path of a bundled image (``"cat_a.jpg"``, ``"cat_b.jpg"``, ``"coffee.jpg"``)."""
    if name not in names():
        raise FileNotFoundError(f"no bundled image {name!r} (bundled: {', '.join(names())})")
    return Path(str(resources.files(__name__) / name))
