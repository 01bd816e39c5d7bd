"""Precomputed teacher embeddings on disk: build once, then look rows up by image key during training.

Layout of a cache folder::

    build.json              settings of the build in progress (teacher, dim, dtype, count, shard size)
    shard-00000.npy         (n_0, dim) float32 or float16 rows, in dataset order
    shard-00000.keys.json   the n_0 keys of those rows
    ...
    keys.json               all keys, row order          } written last; meta.json marks the cache
    meta.json               format, teacher, dim, dtype,  } complete
                            count, shards

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash leaves
either a whole shard or none; a rerun skips shards that are already complete. Keys are the image paths
relative to the dataset root (any unique strings work).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..errors import one_line
from ..fileio import atomic_write, write_text_atomic
from .base import Teacher

FORMAT = "lipsim-embedding-cache"
VERSION = 1
DTYPES = ("float32", "float16")


def _shard_file(i: int) -> str:
    return f"shard-{i:05d}.npy"


def _shard_keys_file(i: int) -> str:
    return f"shard-{i:05d}.keys.json"


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=None if isinstance(obj, list) else 1))


def _device_of(teacher: torch.nn.Module) -> torch.device:
    device = getattr(teacher, "device", None)
    if device is not None:
        return torch.device(device)
    for tensor in (*teacher.parameters(), *teacher.buffers()):
        return tensor.device
    return torch.device("cpu")


def _shard_complete(folder: Path, i: int, rows: int, dim: int, dtype: np.dtype) -> bool:
    data, keys = folder / _shard_file(i), folder / _shard_keys_file(i)
    if not (data.exists() and keys.exists()):
        return False
    try:
        array = np.load(data, mmap_mode="r")
        names = json.loads(keys.read_text())
    except (OSError, ValueError):
        return False
    return array.shape == (rows, dim) and array.dtype == dtype and len(names) == rows


def build_embedding_cache(
    teacher: Teacher,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    shard_size: int = 100_000,
    num_workers: int = 0,
    progress: bool = True,
    dtype: str = "float32",
) -> EmbeddingCache:
    """Embed every item of ``dataset`` with ``teacher`` and store the rows in ``out_dir``.

    ``teacher`` is any module with ``name``, ``dim`` and a forward on [0, 1] images (a ``Teacher``).
    ``dataset[i]`` must be ``(image, key)``: a (3, H, W) float tensor in [0, 1] (equal sizes within a
    batch) and a unique string key. Rows keep the dataset order. ``dtype`` is "float32" (default) or
    "float16" (half the disk; unit-norm embeddings lose about 3 decimal digits). Resumable: complete
    shards of an interrupted build with the same settings are kept; different settings raise.
    Returns the finished cache.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    count = len(dataset)
    if count == 0:
        raise ValueError("the dataset is empty")
    np_dtype = np.dtype(dtype)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": str(teacher.name),
        "dim": int(teacher.dim),
        "dtype": dtype,
        "count": count,
        "shard_size": shard_size,
    }
    build_file = folder / "build.json"
    if build_file.exists():
        previous = json.loads(build_file.read_text())
        if previous != plan:
            changed = sorted(k for k in plan.keys() | previous.keys() if plan.get(k) != previous.get(k))
            raise ValueError(
                f"{folder} holds a cache built with other settings ({', '.join(changed)} differ); "
                "use another folder or delete it"
            )
        if (folder / "meta.json").exists():
            return EmbeddingCache(folder)
    elif any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no embedding-cache build; use an empty folder")
    else:
        _write_json(build_file, plan)

    n_shards = math.ceil(count / shard_size)
    spans = [(i * shard_size, min(count, (i + 1) * shard_size)) for i in range(n_shards)]
    todo = [
        i for i, (a, b) in enumerate(spans) if not _shard_complete(folder, i, b - a, plan["dim"], np_dtype)
    ]
    done_rows = count - sum(spans[i][1] - spans[i][0] for i in todo)
    device = _device_of(teacher)
    bar = tqdm(total=count, initial=done_rows, disable=not progress, unit="img", desc=f"embed {teacher.name}")
    try:
        for i in todo:
            start, stop = spans[i]
            _build_shard(
                teacher,
                dataset,
                folder,
                i,
                start,
                stop,
                plan["dim"],
                np_dtype,
                batch_size,
                num_workers,
                device,
                bar,
            )
    finally:
        bar.close()

    keys: list[str] = []
    for i in range(n_shards):
        keys.extend(json.loads((folder / _shard_keys_file(i)).read_text()))
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"dataset keys must be unique; {key!r} occurs more than once")
        seen.add(key)
    _write_json(folder / "keys.json", keys)
    shards = [{"file": _shard_file(i), "start": a, "count": b - a} for i, (a, b) in enumerate(spans)]
    _write_json(folder / "meta.json", {**plan, "shards": shards})
    return EmbeddingCache(folder)


def _build_shard(
    teacher, dataset, folder, i, start, stop, dim, np_dtype, batch_size, num_workers, device, bar
):
    rows = stop - start
    loader = DataLoader(
        Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    keys: list[str] = []

    def write(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(rows, dim))
        for images, batch_keys in loader:
            batch_keys = list(batch_keys)
            if not all(isinstance(k, str) for k in batch_keys):
                raise TypeError("dataset items must be (image, key) with a str key")
            emb = teacher(images.to(device)).detach().cpu().numpy()
            if emb.shape != (len(batch_keys), dim):
                raise ValueError(f"teacher returned shape {emb.shape}, expected ({len(batch_keys)}, {dim})")
            out[len(keys) : len(keys) + len(batch_keys)] = emb.astype(np_dtype)
            keys.extend(batch_keys)
            bar.update(len(batch_keys))
        if len(keys) != rows:
            raise RuntimeError(f"shard {i}: the dataset yielded {len(keys)} items, expected {rows}")
        out.flush()
        del out

    atomic_write(folder / _shard_file(i), write)
    # The keys file is written after the rows: a shard counts as complete only when both exist.
    _write_json(folder / _shard_keys_file(i), keys)


class EmbeddingCache:
    """Read-only view of a finished cache; rows are memory-mapped (``np.load(mmap_mode="r")``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"{self.path} is not a finished embedding cache (no meta.json); "
                "build it with build_embedding_cache"
            )
        try:
            self._open(meta_file)
        except (KeyError, TypeError, ValueError, RecursionError, OSError) as exc:
            first = one_line(exc)
            if first.startswith(str(self.path)):
                raise ValueError(first) from None
            raise ValueError(f"{self.path}: damaged embedding cache ({first})") from None

    def _open(self, meta_file: Path) -> None:
        """Reads and checks meta.json, keys.json and the shards' headers (not their values: a
        lookup checks the rows it returns)."""
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{meta_file} is not a {FORMAT} v{VERSION} file")
        teacher, dim, dtype, count, shards = (meta[k] for k in ("teacher", "dim", "dtype", "count", "shards"))
        if not isinstance(teacher, str) or type(dim) is not int or dim < 1 or dtype not in DTYPES:
            raise ValueError(f"teacher {teacher!r}, dim {dim!r} or dtype {dtype!r} is unusable")
        if type(count) is not int or count < 0 or not isinstance(shards, list):
            raise ValueError(f"count {count!r} or shards is unusable")
        self.meta = meta
        self.teacher_name: str = teacher
        self.dim: int = dim
        self.dtype = np.dtype(dtype)
        self._keys: list[str] = json.loads((self.path / "keys.json").read_text())
        if not isinstance(self._keys, list) or not all(isinstance(k, str) for k in self._keys):
            raise ValueError("keys.json is not a list of strings")
        if len(self._keys) != count:
            raise ValueError(f"{self.path}: keys.json has {len(self._keys)} keys, meta.json says {count}")
        self._row = {k: i for i, k in enumerate(self._keys)}
        if len(self._row) != len(self._keys):
            raise ValueError("keys.json holds duplicate keys")
        start = 0
        for i, shard in enumerate(shards):  # contiguous, in order, our own file names only
            if (
                not isinstance(shard, dict)
                or shard.get("file") != _shard_file(i)
                or shard.get("start") != start
            ):
                raise ValueError(f"shard entry {i} is not {{file: {_shard_file(i)}, start: {start}, ...}}")
            if type(shard.get("count")) is not int or shard["count"] < 0:
                raise ValueError(f"shard entry {i} has no usable count")
            start += shard["count"]
        if start != count:
            raise ValueError(f"the shards hold {start} rows, meta.json says {count}")
        self._shards = [np.load(self.path / s["file"], mmap_mode="r", allow_pickle=False) for s in shards]
        self._starts = np.array([s["start"] for s in shards], dtype=np.int64)
        for s, array in zip(shards, self._shards, strict=True):
            if array.shape != (s["count"], self.dim) or array.dtype != self.dtype:
                raise ValueError(
                    f"{self.path / s['file']}: {array.dtype} {array.shape}, "
                    f"expected {self.dtype} ({s['count']}, {self.dim})"
                )

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        missing = [k for k in keys if k not in self._row]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise KeyError(f"{missing[0]!r}{more} not in the embedding cache at {self.path}")
        return np.fromiter((self._row[k] for k in keys), dtype=np.int64, count=len(keys))

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """(len(keys), dim) float32 rows for the given keys, in that order."""
        if isinstance(keys, str):
            raise TypeError("lookup takes a list of keys, not a single string")
        index = self.rows(keys)
        out = np.empty((len(index), self.dim), dtype=np.float32)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._shards[s][index[sel] - self._starts[s]]
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            key = keys[int(np.flatnonzero(bad)[0])]
            raise ValueError(
                f"{self.path}: the cached embedding of {key!r} is NaN or infinite (rebuild the cache)"
            )
        return torch.from_numpy(out)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.lookup([key])[0]

    def __repr__(self) -> str:
        where = str(self.path)
        return f"EmbeddingCache({where!r}, teacher={self.teacher_name!r}, n={len(self)}, dim={self.dim})"


class CachedTeacher(Teacher):
    """A teacher backed by an embedding cache: ``lookup(keys)`` instead of a forward pass on pixels.

    ``name`` and ``dim`` are those of the teacher that produced the cache.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.cache = EmbeddingCache(path)
        self.name = self.cache.teacher_name
        self.dim = self.cache.dim
        self.freeze()

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        return self.cache.lookup(keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"a cached teacher ({self.cache.path}) cannot embed pixels; call lookup(keys) with the "
            "images' dataset-relative paths"
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, cache={str(self.cache.path)!r}, n={len(self.cache)}"
