"""A dataset over every image file below a folder (ImageNet's ``train/<wnid>/*.JPEG`` or any tree).

Files are found recursively, matched by extension case-insensitively (``.JPEG`` counts), and
sorted by their path relative to the root, so indices are stable across machines. Hidden files
and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks) are ignored.
Symbolic links to folders are followed once (a link cycle is not walked twice).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..errors import ImageError
from ..images import IMAGE_EXTENSIONS, load_image
from ._io import open_rgb
from .errors import DatasetError

__all__ = ["ImageFolderDataset", "list_images"]


def list_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted posix paths, relative to ``root``, of the image files below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    wanted = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    keys: list[str] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(wanted):
                keys.append((rel / name).as_posix())
    keys.sort()
    return keys


class ImageFolderDataset:
    """Image files below ``root`` as ``(image, key)`` pairs.

    ``key`` is the file's posix path relative to ``root`` (``"n01440764/n01440764_10026.JPEG"``).
    Without ``transform`` the image is ``load_image(path, size, resize="squash")[0]``: a (3, size,
    size) float32 tensor in [0, 1] (RGB, bicubic resize, alpha on white, EXIF orientation applied,
    stretched to a square as before lipsim cropped by default). With
    ``transform`` the file is decoded at native resolution as an 8-bit RGB PIL image and
    ``transform(pil)`` is returned in place of the tensor (``size`` is then unused).

    Unreadable files raise :class:`lipsim.errors.ImageError` unless ``skip_unreadable=True``:
    then item ``i`` is the first readable file at ``i, i+1, ...`` (wrapping around), the keys of
    unreadable files are appended to ``self.bad`` (each once, in the order met) and are skipped
    directly afterwards. ``self.bad`` lives in the process that read the item, so with DataLoader
    workers each worker has its own list. If no file is readable, ``DatasetError`` is raised.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 224,
        transform: Callable[[Image.Image], object] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_unreadable: bool = False,
    ):
        self.root = Path(root)
        self.size = int(size)
        self.transform = transform
        self.skip_unreadable = bool(skip_unreadable)
        self.keys = list_images(self.root, extensions)
        if not self.keys:
            raise DatasetError(f"{self.root}: no image files ({', '.join(extensions)}) found")
        self.bad: list[str] = []
        self._bad_index: set[int] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, index: int) -> Path:
        """Absolute path of item ``index`` (as listed, before any skipping)."""
        return self.root / self.keys[index]

    def _read(self, index: int, reader: Callable[[Path], object]) -> tuple[object, str]:
        n = len(self.keys)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        if not self.skip_unreadable:
            return reader(self.path(index)), self.keys[index]
        for step in range(n):
            i = (index + step) % n
            if i in self._bad_index:
                continue
            try:
                return reader(self.path(i)), self.keys[i]
            except ImageError:
                self._bad_index.add(i)
                self.bad.append(self.keys[i])
        raise DatasetError(f"{self.root}: none of the {n} image files is readable")

    def read_pil(self, index: int) -> tuple[Image.Image, str]:
        """Item ``index`` decoded at native resolution as an 8-bit RGB PIL image, with its key."""
        return self._read(index, open_rgb)

    def __getitem__(self, index: int):
        if self.transform is not None:
            image, key = self.read_pil(index)
            return self.transform(image), key
        image, key = self._read(index, lambda p: load_image(p, self.size, resize="squash")[0])
        return image, key

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, size={self.size})"
