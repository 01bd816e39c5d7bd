"""The storage half of a retrieval index: rows in memory, files on disk, generations, atomic saves.

An :class:`EmbeddingStore` holds unit-norm float32 embeddings (in chunks: the memory map of the
saved file, then the rows added since), the feature norm ‖f(x)‖ of each row (NaN where unknown)
and a unique name per row. On disk (see :mod:`lipsim.retrieval.index` for the layout) each save
writes the data files of a new generation G, then ``meta.json`` (the commit point), then removes
the files of other generations, every file through :mod:`lipsim.fileio`'s atomic writers, so an
interrupted save leaves the previous index readable. Loading validates ``meta.json`` field by
field and scans the rows (in blocks) for finite unit vectors: a damaged or tampered index is an
:class:`IndexFormatError`, never a wrong certificate.

Searching, FAISS structures and certificates live in :mod:`lipsim.retrieval.index`.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import LipSimError
from ..errors import one_line as first_line
from .identity import ModelIdentity

__all__ = [
    "EmbeddingStore",
    "IndexFormatError",
    "FORMAT",
    "FORMAT_VERSION",
    "UNIT_TOL",
    "check_unit",
    "check_norms",
    "check_meta",
    "data_file",
    "first_line",
    "is_index",
    "is_int",
    "is_pairs",
    "read_graph",
    "read_meta",
    "short",
]

FORMAT = "lipsim-index"
FORMAT_VERSION = 2
#: tolerance on ‖e‖ - 1 for embeddings handed to an index directly (and on load)
UNIT_TOL = 1e-4
#: rows per block when rows are streamed (to FAISS or to a file)
BLOCK_ROWS = 65536
_SUFFIX = {"embeddings": ".npy", "norms": ".npy", "paths": ".json", "hnsw": ".faiss"}
_GENERATION = re.compile(r"[0-9a-f]{12}")
_DATA_FILE = re.compile(r"(embeddings|norms|paths|hnsw)(-[0-9a-f]{12})?\.(npy|json|faiss)")


class IndexFormatError(LipSimError, ValueError):
    """A directory that is not a readable lipsim index."""


# -- small checks -----------------------------------------------------------------------------
def data_file(path: Path, name: str, generation: str | None) -> Path:
    """The file of ``name`` ("embeddings", "norms", "paths", "hnsw") of a generation (None: the
    fixed names of format version 1)."""
    return path / (f"{name}{_SUFFIX[name]}" if generation is None else f"{name}-{generation}{_SUFFIX[name]}")


def is_int(value, lo: int, hi: int) -> bool:
    """An integer (not a bool) in [lo, hi]."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and lo <= value <= hi


def is_pairs(value) -> bool:
    """A list of [str, str] pairs (the recorded skipped files)."""
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value
    )


def short(value) -> str:
    """``repr(value)`` cut to 60 characters, for error messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unit_deviation(emb: np.ndarray) -> np.ndarray:
    """|‖e‖ - 1| per row in float64 (NaN or inf for rows that are not finite), in blocks of about
    16 MB so that a memory-mapped array is never read into memory whole."""
    rows = max(1, (1 << 21) // max(1, emb.shape[1]))
    out = np.empty(emb.shape[0], np.float64)
    for s in range(0, emb.shape[0], rows):
        block = np.asarray(emb[s : s + rows], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            out[s : s + rows] = np.abs(np.sqrt(np.einsum("ij,ij->i", block, block)) - 1.0)
    return out


def check_unit(emb: np.ndarray, what: str) -> None:
    """ValueError unless every row is finite with unit norm (within UNIT_TOL)."""
    dev = _unit_deviation(emb)
    bad = ~(dev <= UNIT_TOL)  # NaN too
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{what} must be finite with unit norm ({int(bad.sum())} row(s) are not; row {row}: "
            f"|‖e‖ - 1| = {dev[row]:.2e})"
        )


def check_norms(norms: np.ndarray, what: str) -> None:
    """ValueError unless every feature norm is ≥ 0 and finite, or NaN (unknown)."""
    if norms.dtype.kind != "f":
        raise ValueError(f"{what} must be floating point, got {norms.dtype}")
    with np.errstate(invalid="ignore"):
        bad = np.isinf(norms) | (norms < 0)
    if bad.any():
        raise ValueError(f"{what} must be non-negative and finite ({int(bad.sum())} are not)")


# -- meta.json --------------------------------------------------------------------------------
def check_meta(meta) -> tuple:
    """(count, dim, generation, identity, Index keyword arguments, info) of a parsed meta.json;
    ValueError (one line) for anything out of schema."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("not a lipsim index description")
    version = meta.get("format_version")
    if not is_int(version, 1, 1 << 31):
        raise ValueError(f"format_version must be a positive integer, got {short(version)}")
    if version > FORMAT_VERSION:
        raise ValueError(f"index format {version} is newer than this lipsim")
    n, dim = meta.get("count"), meta.get("dim")
    if not is_int(n, 0, 1 << 62) or not is_int(dim, 1, 1 << 31):
        raise ValueError(f"count and dim must be integers ≥ 0 and ≥ 1, got {short(n)} and {short(dim)}")
    generation = meta.get("generation") if version >= 2 else None
    if version >= 2 and not (isinstance(generation, str) and _GENERATION.fullmatch(generation)):
        raise ValueError(f"generation must be 12 hexadecimal digits, got {short(generation)}")
    identity = None if meta.get("model") is None else ModelIdentity.from_dict(meta["model"])
    approx = meta.get("approximate")
    if approx is not None and not (isinstance(approx, dict) and approx.get("kind") == "hnsw"):
        raise ValueError(f'approximate must be null or {{"kind": "hnsw", ...}}, got {short(approx)}')
    settings = {"approximate": None if approx is None else "hnsw"}
    for key, arg in (("M", "hnsw_m"), ("ef_construction", "ef_construction"), ("ef_search", "ef_search")):
        if approx is not None and key in approx:
            settings[arg] = approx[key]
    info = {} if meta.get("info") is None else meta["info"]
    if not isinstance(info, dict):
        raise ValueError(f"info must be an object, got {short(info)}")
    for key in ("root", "model_source"):
        if not isinstance(info.get(key), str | None):
            raise ValueError(f"info.{key} must be a string, got {short(info[key])}")
    if not is_pairs(info.get("skipped", [])):
        raise ValueError("info.skipped must be a list of [path, reason] pairs")
    return n, dim, generation, identity, settings, dict(info)


def is_index(path) -> bool:
    """Whether ``path`` holds a meta.json of the index format (not whether the index is sound)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def read_meta(path: Path):
    """The parsed meta.json of an index directory; IndexFormatError (one line) when it is missing
    or unreadable (schema checks: :func:`check_meta`)."""
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index directory")
    try:
        return json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        unfinished = (path / "partial").is_dir()
        hint = " (an unfinished build: rerun 'lipsim index' to complete it)" if unfinished else ""
        raise IndexFormatError(f"{path}: not a lipsim index (no meta.json){hint}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise IndexFormatError(f"{path}/meta.json: unreadable ({first_line(exc)})") from None


def _graph_ok(faiss, index, dim: int, n: int) -> bool:
    """Whether ``index`` is an inner-product HNSW graph of n rows of dimension dim with a consistent
    link table (each node's neighbour lists sized by its level, every link a valid id): a check
    against damage that keeps FAISS from reading out of bounds, not a proof against crafted files."""
    if not isinstance(index, faiss.IndexHNSWFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return False
    if (index.d, index.ntotal) != (dim, n) or n == 0:
        return (index.d, index.ntotal) == (dim, n)
    g = index.hnsw
    links, offsets, levels, cum, probas = (
        faiss.vector_to_array(v).astype(np.int64)
        for v in (g.neighbors, g.offsets, g.levels, g.cum_nneighbor_per_level, g.assign_probas)
    )
    if levels.size != n or offsets.size != n + 1 or cum.size != probas.size + 1 or links.size == 0:
        return False
    return bool(
        1 <= levels.min() <= levels.max() < cum.size
        and g.max_level == levels.max() - 1
        and offsets[0] == 0
        and offsets[-1] == links.size
        and np.array_equal(np.diff(offsets), cum[levels])
        and -1 <= links.min() <= links.max() < n
        and 0 <= g.entry_point < n
    )


def read_graph(file: Path, dim: int, n: int):
    """The HNSW graph stored in ``file``, refused (IndexFormatError) unless it is an inner-product
    HNSW graph of the index's n rows of dimension dim."""
    import faiss

    try:
        index = faiss.read_index(str(file))
    except Exception as exc:  # faiss raises RuntimeError for damaged files
        why = first_line(exc).split("Error: ", 1)[-1]
        raise IndexFormatError(f"{file}: damaged HNSW graph ({why})") from None
    if not _graph_ok(faiss, index, dim, n):
        raise IndexFormatError(f"{file}: not a valid HNSW graph of this index's {n} rows")
    return index


# -- the rows ---------------------------------------------------------------------------------
class EmbeddingStore:
    """Rows of an index: unit float32 embeddings of dimension ``dim``, feature norms, unique names."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self._emb: list[np.ndarray] = []
        self._norms: list[np.ndarray] = []
        self._offsets = [0]
        self._paths: list[str] = []
        self._path_set: set[str] = set()

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def path(self, i: int) -> str:
        return self._paths[i]

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) float32; the memory map itself right after loading, a copy once rows were added."""
        if len(self._emb) == 1:
            return self._emb[0]
        if not self._emb:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(self._emb)

    @property
    def norms(self) -> np.ndarray:
        if not self._norms:
            return np.zeros((0,), np.float32)
        return self._norms[0] if len(self._norms) == 1 else np.concatenate(self._norms)

    def rows(self, ids) -> np.ndarray:
        """Embeddings of the given row ids, (len(ids), D) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError("item id out of range")
        out = np.empty((ids.size, self.dim), np.float32)
        chunk = np.searchsorted(np.asarray(self._offsets), ids, side="right") - 1
        for c in np.unique(chunk):
            sel = np.nonzero(chunk == c)[0]
            out[sel] = self._emb[c][ids[sel] - self._offsets[c]]
        return out

    def blocks(self, start: int = 0) -> Iterator[np.ndarray]:
        """The rows from ``start`` on, as contiguous float32 blocks of at most BLOCK_ROWS rows."""
        for c, arr in enumerate(self._emb):
            lo = self._offsets[c]
            if lo + arr.shape[0] <= start:
                continue
            begin = max(0, start - lo)
            for s in range(begin, arr.shape[0], BLOCK_ROWS):
                yield np.ascontiguousarray(arr[s : s + BLOCK_ROWS], dtype=np.float32)

    def append(self, emb: np.ndarray, norms: np.ndarray | None, paths) -> int:
        """Appends rows after checking them: dimension, finite unit rows, norms ≥ 0 (or NaN),
        one unique name per row (default ``item-<id>``). Returns the number of rows added."""
        n = emb.shape[0]
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {emb.shape[-1]}, the index holds {self.dim}")
        check_unit(emb, "embeddings")
        if norms is not None:
            check_norms(norms, "norms")
        if paths is None:
            paths = [f"item-{len(self) + i}" for i in range(n)]
        paths = [str(p) for p in paths]
        if len(paths) != n:
            raise ValueError(f"{n} items but {len(paths)} paths")
        new = set(paths)
        if len(new) != n or new & self._path_set:
            dup = sorted((new & self._path_set) or {p for p in paths if paths.count(p) > 1})[:3]
            raise ValueError(f"paths must be unique in an index (duplicates: {dup})")
        if n == 0:
            return 0
        if norms is None:
            norms = np.full((n,), np.nan, np.float32)
        self._emb.append(emb)
        self._norms.append(np.asarray(norms, np.float32))
        self._offsets.append(self._offsets[-1] + n)
        self._paths.extend(paths)
        self._path_set |= new
        return n

    # -- files --------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict, write_graph: Callable[[Path], None] | None = None) -> Path:
        """Writes the rows as a new generation, then ``write_graph(file)`` (the search graph, if
        any), then meta.json (``meta``: the fields after format, version, generation, count and
        dim), then removes the files of other generations. Returns the graph's file name."""
        path.mkdir(parents=True, exist_ok=True)
        n = len(self)
        generation = secrets.token_hex(6)

        def write_embeddings(tmp):
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, self.dim))
            row = 0
            for block in self.blocks():
                arr[row : row + block.shape[0]] = block
                row += block.shape[0]
            arr.flush()
            del arr

        fileio.atomic_write(data_file(path, "embeddings", generation), write_embeddings)
        fileio.write_npy_atomic(data_file(path, "norms", generation), np.asarray(self.norms, np.float32))
        fileio.write_text_atomic(
            data_file(path, "paths", generation), json.dumps(self._paths, ensure_ascii=False)
        )
        graph_file = data_file(path, "hnsw", generation)
        if write_graph is not None:
            write_graph(graph_file)
        head = {"format": FORMAT, "format_version": FORMAT_VERSION, "generation": generation, "count": n}
        full = {**head, "dim": self.dim, **meta}
        fileio.write_text_atomic(path / "meta.json", json.dumps(full, indent=1, ensure_ascii=False))
        for file in path.iterdir():  # other generations and the version-1 names
            match = _DATA_FILE.fullmatch(file.name)
            if match and match[2] != f"-{generation}":
                with contextlib.suppress(OSError):  # a leftover is harmless: nothing refers to it
                    file.unlink()
        return graph_file

    @classmethod
    def load(cls, path: Path, n: int, dim: int, generation: str | None, mmap: bool = True) -> EmbeddingStore:
        """The rows of generation ``generation`` (n rows of dimension dim, as meta.json says),
        memory-mapped with ``mmap``; IndexFormatError naming the file for anything damaged."""
        files = {name: data_file(path, name, generation) for name in ("embeddings", "norms", "paths")}
        names = {name: file.name for name, file in files.items()}
        try:
            emb = np.load(files["embeddings"], mmap_mode="r" if mmap else None, allow_pickle=False)
            norms = np.load(files["norms"], allow_pickle=False)
            paths = json.loads(files["paths"].read_text(encoding="utf-8"))
        except MemoryError:
            raise
        except Exception as exc:  # numpy raises many kinds for damaged headers
            raise IndexFormatError(f"{path}: damaged index ({first_line(exc)})") from None
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape != (n, dim):
            raise IndexFormatError(
                f"{path}: {names['embeddings']} is {emb.dtype} {emb.shape}, meta says float32 ({n}, {dim})"
            )
        if norms.shape != (n,) or not isinstance(paths, list) or len(paths) != n:
            raise IndexFormatError(f"{path}: {names['norms']}/{names['paths']} do not hold {n} entries")
        if not all(isinstance(p, str) for p in paths):
            raise IndexFormatError(f"{path}: {names['paths']} must hold strings")
        try:
            check_norms(norms, names["norms"])
            check_unit(emb, names["embeddings"])
        except ValueError as exc:
            raise IndexFormatError(f"{path}: {exc}") from None
        store = cls(dim)
        if n:
            store._emb.append(emb)
            store._norms.append(norms.astype(np.float32))
            store._offsets.append(n)
            store._paths = paths
            store._path_set = set(paths)
            if len(store._path_set) != n:
                raise IndexFormatError(f"{path}: {names['paths']} holds duplicate names")
        return store
