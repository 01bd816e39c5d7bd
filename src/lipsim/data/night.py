"""NIGHT (DreamSim's "NIGHTS") 2AFC triplets from the published folder layout (docs/method.md §8.1).

``root`` is the folder that holds ``data.csv`` (and, relative to it, ``ref/…`` and ``distort/…``).
``data.csv`` is read the way the reference loaders read it: **by position** for column 0 (``id``),
column 2 (``right_vote``, the label), columns 4, 5, 6 (``ref_path``, ``left_path``,
``right_path``, relative to root); **by name** for ``votes``, ``split`` and ``is_imagenet``; and an
optional ``family`` column (written by the synthetic generator) is passed through.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..images import load_image
from .errors import DatasetError

__all__ = ["NightDataset", "NIGHT_SPLITS", "TripletRecord", "load_triplet"]

#: the record make-2afc writes beside its data.csv: its test rows form the group "synthetic"
SYNTHETIC_MARKER = "synthetic.json"
NIGHT_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
_TRUE = {"true", "1", "1.0", "yes", "t", "y"}
_FALSE = {"false", "0", "0.0", "no", "f", "n"}


@dataclass(frozen=True)
class TripletRecord:
    """One 2AFC triplet on disk: reference, the two candidates, and the human preference.

    ``y`` is the fraction of judges who found ``x1`` closer to ``ref`` (0 -> all chose ``x0``).
    """

    id: str
    ref: Path
    x0: Path
    x1: Path
    y: float
    group: str
    family: str = ""


def load_triplet(record: TripletRecord, size: int = 224) -> dict:
    """Loads a triplet as the item dict every 2AFC dataset returns:
    ``{"ref", "x0", "x1": (3, size, size) float32 in [0, 1], "y": float64 scalar tensor,
    "id": str, "group": str, "family": str}``. Images are stretched to size×size ("squash"), as the
    reference evaluation resizes them (NIGHT and BAPPS images are square, so nothing is cut)."""
    return {
        "ref": load_image(record.ref, size, resize="squash")[0],
        "x0": load_image(record.x0, size, resize="squash")[0],
        "x1": load_image(record.x1, size, resize="squash")[0],
        "y": torch.tensor(record.y, dtype=torch.float64),  # k/5 fractions exactly (0.8, not 0.80000001)
        "id": record.id,
        "group": record.group,
        "family": record.family,
    }


def _parse_bool(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise DatasetError(f"{where}: is_imagenet must be true/false, got {text!r}")


def _parse_float(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {column} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {column} must be finite, got {text!r}")
    return value


def _inside(root: Path, text: str, column: str, where: str) -> Path:
    """``root / text`` for a relative path that stays inside ``root`` (``..`` may not climb out)."""
    rel = text.strip()
    if not rel or os.path.isabs(rel) or Path(os.path.normpath(rel)).parts[:1] == ("..",):
        raise DatasetError(f"{where}: {column} must be a relative path inside the root, got {text!r}")
    return root / rel


class TripletDataset:
    """Shared behaviour of the 2AFC readers: ``records`` (a list of :class:`TripletRecord`) and
    ``size``; items are loaded lazily by :func:`load_triplet`."""

    records: list[TripletRecord]
    size: int

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return load_triplet(self.records[index], self.size)

    def group_counts(self) -> dict[str, int]:
        """Number of triplets per group (NIGHT split group, BAPPS category), in first-seen order."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.group] = counts.get(record.group, 0) + 1
        return counts


class NightDataset(TripletDataset):
    """NIGHT triplets of one split with at least ``min_votes`` votes.

    Splits: ``"train"``, ``"val"``, ``"test"`` (= ``"test_imagenet"`` + ``"test_no_imagenet"``,
    in file order), ``"test_imagenet"`` and ``"test_no_imagenet"`` (``split == "test"`` rows
    separated by ``is_imagenet``). Rows with ``votes < min_votes`` are dropped (6 = unanimous,
    as in the dataset's own loader).

    Item ``i`` is ``{"ref", "x0", "x1"}`` -> (3, size, size) float32 tensors in [0, 1] (bicubic
    resize), ``"y"`` -> float64 scalar tensor, the fraction of judges preferring ``x1`` (the
    right image), ``"id"`` -> str, ``"group"`` -> ``"test_imagenet"``/``"test_no_imagenet"`` for
    test rows (``"synthetic"`` in a ``lipsim make-2afc`` folder, which holds no ImageNet split),
    else the split name, ``"family"`` -> the ``family`` column or ``""``.

    Raises :class:`DatasetError` (a ``ValueError``) with a one-line message for a missing
    ``data.csv``, missing columns, malformed values, an image path that is absolute or leaves
    ``root`` through ``..``, an image file that does not exist (checked for every kept row at
    construction unless ``check_files=False``) or an empty split.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        size: int = 224,
        min_votes: float = 6,
        check_files: bool = True,
    ):
        if split not in NIGHT_SPLITS:
            raise DatasetError(f"unknown NIGHT split {split!r} (choose from {', '.join(NIGHT_SPLITS)})")
        self.root = Path(root)
        self.split = split
        self.size = int(size)
        self.min_votes = min_votes
        self.records = self._read_csv()
        if check_files:
            self._check_files()

    def _read_csv(self) -> list[TripletRecord]:
        csv_path = self.root / "data.csv"
        if not csv_path.is_file():
            raise DatasetError(f"{csv_path}: no such file (root must be the folder that holds data.csv)")
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.reader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"{csv_path}: cannot read ({exc})") from None
        if not rows:
            raise DatasetError(f"{csv_path}: empty file")
        header = [name.strip() for name in rows[0]]
        if len(header) < 7:
            raise DatasetError(
                f"{csv_path}: expected at least 7 columns (id, left_vote, right_vote, votes, ref_path, "
                f"left_path, right_path, ...), found {len(header)}"
            )
        needed = ["votes", "split"] + (["is_imagenet"] if self.split.startswith("test") else [])
        missing = [name for name in needed if name not in header]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        col = {
            name: header.index(name) for name in ("votes", "split", "is_imagenet", "family") if name in header
        }
        n_fields = max([6, *col.values()]) + 1
        want_split = "test" if self.split.startswith("test") else self.split
        # a make-2afc folder (synthetic.json beside data.csv) has no ImageNet/non-ImageNet halves
        synthetic = (self.root / SYNTHETIC_MARKER).is_file()

        records = []
        n_rows = 0
        for line_no, row in enumerate(rows[1:], start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            n_rows += 1
            where = f"{csv_path}:{line_no}"
            if len(row) < n_fields:
                raise DatasetError(f"{where}: {len(row)} fields, expected at least {n_fields}")
            if row[col["split"]].strip() != want_split:
                continue
            if _parse_float(row[col["votes"]], "votes", where) < self.min_votes:
                continue
            if want_split == "test":
                imagenet = _parse_bool(row[col["is_imagenet"]], where)
                group = "test_imagenet" if imagenet else "test_no_imagenet"
                if self.split != "test" and group != self.split:
                    continue
                if synthetic:
                    group = "synthetic"
            else:
                group = self.split
            y = _parse_float(row[2], "right_vote (column 2)", where)
            if not 0.0 <= y <= 1.0:
                raise DatasetError(f"{where}: right_vote (column 2) must be a fraction in [0, 1], got {y}")
            records.append(
                TripletRecord(
                    id=row[0].strip(),
                    ref=_inside(self.root, row[4], "ref_path (column 4)", where),
                    x0=_inside(self.root, row[5], "left_path (column 5)", where),
                    x1=_inside(self.root, row[6], "right_path (column 6)", where),
                    y=y,
                    group=group,
                    family=row[col["family"]].strip() if "family" in col else "",
                )
            )
        if not records:
            raise DatasetError(
                f"{csv_path}: no triplets in split {self.split!r} with votes >= {self.min_votes:g} "
                f"({n_rows} rows in the file)"
            )
        return records

    def _check_files(self) -> None:
        missing = [p for r in self.records for p in (r.ref, r.x0, r.x1) if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"missing image file {missing[0]}{more}")

    def __repr__(self) -> str:
        return f"NightDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
