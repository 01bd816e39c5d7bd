"""BAPPS 2AFC triplets (LPIPS) from the published folder layout (docs/method.md §8.2).

Layout: ``<2afc>/<split>/<category>/{ref,p0,p1}/NNNNNN.png`` and ``judge/NNNNNN.npy`` (one float
per triplet, the fraction of judges preferring ``p1``). ``root`` may be

1. the ``2afc`` folder itself (it contains ``<split>/``),
2. a folder containing ``2afc/`` (LPIPS' ``dataset/`` download folder), or
3. a folder containing ``bapps/2afc/`` (LipSim's ``--data_dir`` convention),

tried in that order. Images are returned in **[0, 1]** (not LPIPS' [-1, 1]), resized to
``size`` × ``size`` bicubic.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import one_line
from ..images import IMAGE_EXTENSIONS
from .errors import DatasetError
from .night import TripletDataset, TripletRecord

__all__ = ["BappsDataset", "BAPPS_CATEGORIES", "find_bapps_2afc"]

#: default categories per split, in reporting order (docs/method.md §7.4, §8.2)
BAPPS_CATEGORIES = {
    "val": ("traditional", "cnn", "superres", "deblur", "color", "frameinterp"),
    "train": ("traditional", "cnn", "mix"),
}


def find_bapps_2afc(root: str | os.PathLike, split: str) -> Path:
    """The ``2afc`` folder for ``root`` (see the module docstring for the accepted layouts)."""
    root = Path(root)
    for candidate in (root, root / "2afc", root / "bapps" / "2afc"):
        if (candidate / split).is_dir():
            return candidate
    raise DatasetError(
        f"{root}: no BAPPS split {split!r} found (looked for {split}/, 2afc/{split}/ and bapps/2afc/{split}/)"
    )


def _sorted_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder")
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
        ),
        key=lambda p: p.name,
    )


def _read_judge(path: Path) -> float:
    """The one fraction in a judge file: a real (integer or float) array of one value, finite, in [0, 1]."""
    try:  # memory-mapped: a header that declares a huge shape cannot make us allocate it
        value = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        msg = one_line(exc, limit=10_000)
        raise DatasetError(f"{path}: cannot read judgement ({msg})") from None
    if not isinstance(value, np.ndarray):
        if hasattr(value, "close"):
            value.close()
        raise DatasetError(f"{path}: expected a .npy array, got {type(value).__name__}")
    if value.dtype.kind not in "iuf":
        raise DatasetError(f"{path}: expected a real number, got an array of dtype {value.dtype}")
    if value.size != 1:
        raise DatasetError(f"{path}: expected one fraction in [0, 1], got an array of shape {value.shape}")
    item = value.reshape(-1)[0]
    # the shortest decimal of the stored float (a float32 0.8 is 0.8, not 0.800000011920929)
    y = float(np.format_float_positional(item, unique=True)) if value.dtype.kind == "f" else float(item)
    if not (math.isfinite(y) and 0.0 <= y <= 1.0):
        raise DatasetError(f"{path}: expected one fraction in [0, 1], got {y}")
    return y


class BappsDataset(TripletDataset):
    """BAPPS 2AFC triplets of ``split`` (``"val"`` or ``"train"``) over ``categories``.

    ``categories=None`` takes the default list of the split that is present on disk (val:
    traditional, cnn, superres, deblur, color, frameinterp; train: traditional, cnn, mix; for
    another split name every category folder found); a category named explicitly must exist.
    Within a category ``ref/``, ``p0/``, ``p1/`` and ``judge/`` are paired by sorted file name,
    and the stems must agree (``000123.png`` with ``000123.npy``).

    Item ``i`` is ``{"ref", "x0", "x1"}`` -> (3, size, size) float32 tensors in [0, 1] (``x0`` =
    p0, ``x1`` = p1), ``"y"`` -> float64 scalar tensor, the fraction preferring p1, ``"id"`` ->
    ``"<category>/<stem>"``, ``"group"`` -> the category, ``"family"`` -> ``""``. Judgement files
    are read at construction and checked to hold one value in [0, 1].
    """

    def __init__(self, root: str | os.PathLike, split: str = "val", categories=None, size: int = 224):
        self.root = Path(root)
        self.split = split
        self.size = int(size)
        self.base = find_bapps_2afc(self.root, split)
        split_dir = self.base / split
        if categories is None:
            if split in BAPPS_CATEGORIES:
                names = [c for c in BAPPS_CATEGORIES[split] if (split_dir / c).is_dir()]
            else:
                names = sorted(
                    p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                )
            if not names:
                expected = ", ".join(BAPPS_CATEGORIES.get(split, ("<category>",)))
                raise DatasetError(f"{split_dir}: no category folders found (expected some of {expected})")
        else:
            names = [categories] if isinstance(categories, str) else list(categories)
            if not names:
                raise DatasetError("categories: empty list")
            absent = [c for c in names if not (split_dir / c).is_dir()]
            if absent:
                raise DatasetError(f"{split_dir}: missing category folder(s) {', '.join(absent)}")
        self.categories = names
        self.records: list[TripletRecord] = []
        for category in names:
            self.records.extend(self._read_category(split_dir / category, category))

    def _read_category(self, folder: Path, category: str) -> list[TripletRecord]:
        suffixes = tuple(IMAGE_EXTENSIONS)
        refs = _sorted_files(folder / "ref", suffixes)
        p0s = _sorted_files(folder / "p0", suffixes)
        p1s = _sorted_files(folder / "p1", suffixes)
        judges = _sorted_files(folder / "judge", (".npy",))
        counts = {"ref": len(refs), "p0": len(p0s), "p1": len(p1s), "judge": len(judges)}
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{k} {v}" for k, v in counts.items())
            raise DatasetError(f"{folder}: file counts differ ({listed})")
        if not refs:
            raise DatasetError(f"{folder}: no triplets (ref/ is empty)")
        records = []
        for ref, p0, p1, judge in zip(refs, p0s, p1s, judges, strict=True):
            if not ref.stem == p0.stem == p1.stem == judge.stem:
                raise DatasetError(
                    f"{folder}: files do not pair up by name: ref/{ref.name}, p0/{p0.name}, "
                    f"p1/{p1.name}, judge/{judge.name}"
                )
            records.append(
                TripletRecord(
                    id=f"{category}/{ref.stem}", ref=ref, x0=p0, x1=p1, y=_read_judge(judge), group=category
                )
            )
        return records

    def __repr__(self) -> str:
        return f"BappsDataset(root={str(self.root)!r}, split={self.split!r}, categories={self.categories})"
