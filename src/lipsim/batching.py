"""Batches and progress bars for work over many images (torch-free; shared by the torch model,
the NumPy engine and the command line)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

__all__ = ["check_batch_size", "batch_slices", "progress_bar", "in_batches"]

#: a progress bar is shown (on a terminal) when there are at least this many images
PROGRESS_MIN_ITEMS = 64


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def progress_bar(total: int, enabled: bool | None, desc: str):
    """A tqdm bar on stderr counting images. ``enabled=None``: shown for at least
    :data:`PROGRESS_MIN_ITEMS` images when stderr is a terminal; True/False force it."""
    from tqdm import tqdm

    if enabled is None:
        enabled = total >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def batch_slices(
    n: int, batch_size: int, progress: bool | None = False, desc: str = "embedding"
) -> Iterator[slice]:
    """Slices ``[i, i + batch_size)`` covering ``range(n)``, advancing a progress bar."""
    check_batch_size(batch_size)
    with progress_bar(n, progress, desc) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield slice(start, stop)
            bar.update(stop - start)


def in_batches(
    fn: Callable, x, batch_size: int, concat: Callable, progress: bool | None = False, desc: str = "embedding"
):
    """``concat([fn(x[s]) for s in batches])``: one pass of ``fn`` over ``x`` in batches."""
    return concat([fn(x[s]) for s in batch_slices(len(x), batch_size, progress, desc)])
