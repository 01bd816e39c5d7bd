"""A gallery of LipSim embeddings with exact (certifiable) and approximate nearest-neighbour search.

Storage: unit-norm float32 embeddings (one row per item) with their paths, the feature norms
‖f(x)‖ (needed by plain-mode certificates) and the identity of the model that produced them. On
disk an index is a directory::

    meta.json            format, model identity, approximate settings, free-form info, generation G
    embeddings-G.npy     float32 (N, D), memory-mapped on load
    norms-G.npy          float32 (N,) ‖f(x)‖ (NaN where embeddings were added without them)
    paths-G.json         the N item names (relative paths)
    hnsw-G.faiss         the HNSW graph, only for approximate indexes

Each save writes the data files of a new generation G (a random hex id), then meta.json (the
commit point: each file is replaced atomically), then removes the files of other generations, so
an interrupted save leaves the previous index readable. Format version 1 (still read) had no G:
``embeddings.npy``, ``norms.npy``, ``paths.json``, ``hnsw.faiss``. Loading validates meta.json
field by field and scans the embeddings (in blocks) for finite unit rows: a damaged or tampered
index is refused (:class:`IndexFormatError`) instead of producing wrong certificates.

Search: exact search is FAISS ``IndexFlatIP`` on the unit vectors (d = 1 - inner product); the K
candidates' distances are then recomputed in float64 from the stored embeddings and the top-1
certificate of :func:`lipsim.retrieval.certificate.top1_radius` is attached. The approximate
option (``IndexHNSWFlat`` with the inner-product metric) may miss the true neighbours, so its
answers are **not certifiable**; with ``rerank=R`` the R candidates it returns are re-ranked
exactly and the radius certifies only "the top-1 stays the nearest *among those candidates*",
not that it is the nearest item of the gallery. ``exact=True`` searches an approximate index
exactly (the embeddings are all stored).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LipSimError
from ..fileio import atomic_write, write_npy_atomic, write_text_atomic
from .certificate import search_allowance, top1_radius
from .identity import ModelIdentity

__all__ = ["Index", "SearchResult", "IndexFormatError", "embed_images"]

FORMAT = "lipsim-index"
FORMAT_VERSION = 2
#: tolerance on ‖e‖ - 1 for embeddings handed to :meth:`Index.add` directly (and on load)
UNIT_TOL = 1e-4
_ADD_BLOCK = 65536
#: HNSW settings, inclusive integer ranges (M < 2 crashes FAISS; a huge efSearch exhausts memory)
HNSW_LIMITS = {"M": (2, 1024), "ef_construction": (1, 1 << 20), "ef_search": (1, 1 << 20)}
_SUFFIX = {"embeddings": ".npy", "norms": ".npy", "paths": ".json", "hnsw": ".faiss"}
_GENERATION = re.compile(r"[0-9a-f]{12}")
_DATA_FILE = re.compile(r"(embeddings|norms|paths|hnsw)(-[0-9a-f]{12})?\.(npy|json|faiss)")
#: default number of exact candidates examined by the top-1 certificate
CERTIFY_K = 32


class IndexFormatError(LipSimError, ValueError):
    """A directory that is not a readable lipsim index."""


def _data_file(path: Path, name: str, generation: str | None) -> Path:
    return path / (f"{name}{_SUFFIX[name]}" if generation is None else f"{name}-{generation}{_SUFFIX[name]}")


def _is_int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and lo <= value <= hi


def _is_pairs(value) -> bool:
    """A list of [str, str] pairs (the recorded skipped files)."""
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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


def _check_unit(emb: np.ndarray, what: str) -> None:
    """ValueError unless every row is finite with unit norm (within UNIT_TOL)."""
    dev = _unit_deviation(emb)
    bad = ~(dev <= UNIT_TOL)  # NaN too
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{what} must be finite with unit norm ({int(bad.sum())} row(s) are not; row {row}: "
            f"|‖e‖ - 1| = {dev[row]:.2e})"
        )


def _check_norms(norms: np.ndarray, what: str) -> None:
    """ValueError unless every feature norm is ≥ 0 and finite, or NaN (unknown)."""
    if norms.dtype.kind != "f":
        raise ValueError(f"{what} must be floating point, got {norms.dtype}")
    with np.errstate(invalid="ignore"):
        bad = np.isinf(norms) | (norms < 0)
    if bad.any():
        raise ValueError(f"{what} must be non-negative and finite ({int(bad.sum())} are not)")


def _check_meta(meta) -> tuple:
    """(count, dim, generation, identity, Index keyword arguments, info) of a parsed meta.json;
    ValueError (one line) for anything out of schema."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError("not a lipsim index description")
    version = meta.get("format_version")
    if not _is_int(version, 1, 1 << 31):
        raise ValueError(f"format_version must be a positive integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise ValueError(f"index format {version} is newer than this lipsim")
    n, dim = meta.get("count"), meta.get("dim")
    if not _is_int(n, 0, 1 << 62) or not _is_int(dim, 1, 1 << 31):
        raise ValueError(f"count and dim must be integers ≥ 0 and ≥ 1, got {_short(n)} and {_short(dim)}")
    generation = meta.get("generation") if version >= 2 else None
    if version >= 2 and not (isinstance(generation, str) and _GENERATION.fullmatch(generation)):
        raise ValueError(f"generation must be 12 hexadecimal digits, got {_short(generation)}")
    identity = None if meta.get("model") is None else ModelIdentity.from_dict(meta["model"])
    approx = meta.get("approximate")
    if approx is not None and not (isinstance(approx, dict) and approx.get("kind") == "hnsw"):
        raise ValueError(f'approximate must be null or {{"kind": "hnsw", ...}}, got {_short(approx)}')
    settings = {"approximate": None if approx is None else "hnsw"}
    for key, arg in (("M", "hnsw_m"), ("ef_construction", "ef_construction"), ("ef_search", "ef_search")):
        if approx is not None and key in approx:
            settings[arg] = approx[key]
    info = {} if meta.get("info") is None else meta["info"]
    if not isinstance(info, dict):
        raise ValueError(f"info must be an object, got {_short(info)}")
    for key in ("root", "model_source"):
        if not isinstance(info.get(key), str | None):
            raise ValueError(f"info.{key} must be a string, got {_short(info[key])}")
    if not _is_pairs(info.get("skipped", [])):
        raise ValueError("info.skipped must be a list of [path, reason] pairs")
    return n, dim, generation, identity, settings, dict(info)


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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class SearchResult:
    """Nearest gallery items for one query, nearest first.

    ``distances`` are float64 recomputations from the stored embeddings. ``certified_radius``:
    no ℓ2 perturbation of the query (in [0, 1] pixel units) with a smaller norm changes the
    top-1, within ``scope``: "gallery" (exact search: the whole index), "candidates"
    (approximate search with exact re-ranking: only among the retrieved candidates) or "none"
    (``certified_radius`` is None: not certifiable, see ``note``). ``math.inf`` when the
    gallery has a single item.
    """

    ids: np.ndarray
    paths: list[str]
    distances: np.ndarray
    certified_radius: float | None
    scope: str
    note: str = ""
    candidates: int = 0

    def as_dict(self) -> dict:
        radius = self.certified_radius
        out = {
            "results": [
                {"path": p, "distance": float(d)} for p, d in zip(self.paths, self.distances, strict=True)
            ],
            "certified_radius": None if radius is None or radius == float("inf") else float(radius),
            "certified_scope": self.scope,
            "candidates": self.candidates,
        }
        if radius == float("inf"):
            out["unbounded"] = True
        if self.note:
            out["note"] = self.note
        return out


def _as_float_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected (B, D) embeddings, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return np.ascontiguousarray(arr)


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings g(x) (float32, (B, D)) and feature norms ‖f(x)‖ (float32, (B,)) of images
    (B, 3, S, S) in [0, 1], computed in exact float32 by the model, in batches."""
    embs, norms = [], []
    for start in range(0, images.shape[0], batch_size):
        f = model.features(images[start : start + batch_size])
        embs.append(model._normalise(f).cpu().numpy().astype(np.float32))
        norms.append(torch.linalg.vector_norm(f.double(), dim=1).cpu().numpy().astype(np.float32))
    if not embs:
        return np.zeros((0, model.embed_dim), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(embs), np.concatenate(norms)


class Index:
    """Embeddings of a gallery, searchable with certificates (module docstring).

    ``Index(model)`` takes its dimension and identity from the model (needed to add or search
    *images*); ``Index(dim=D)`` (optionally ``identity=``) holds embeddings only; without an
    identity its certificates assume the embeddings come from a 1-Lipschitz (append-mode) g.
    ``approximate="hnsw"`` adds an HNSW graph (not certifiable). GPU FAISS is used for the exact
    index when ``faiss.get_num_gpus() > 0`` unless ``use_gpu=False``.
    """

    def __init__(
        self,
        model=None,
        *,
        dim: int | None = None,
        identity: ModelIdentity | None = None,
        approximate: str | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        use_gpu: bool | None = None,
    ):
        if approximate not in (None, "hnsw"):
            raise ValueError(f"approximate must be None or 'hnsw', got {approximate!r}")
        for key, value in (("M", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            lo, hi = HNSW_LIMITS[key]
            if not _is_int(value, lo, hi):
                raise ValueError(f"HNSW {key} must be an integer in [{lo}, {hi}], got {_short(value)}")
        self.model = None
        if model is not None:
            identity = ModelIdentity.of(model)
            dim = identity.dim
            self.model = model
        if dim is None:
            if identity is None:
                raise ValueError("Index needs a model, a dim or an identity")
            dim = identity.dim
        if not _is_int(dim, 1, 1 << 31):
            raise ValueError(f"dim must be a positive integer, got {_short(dim)}")
        if identity is not None and identity.dim != dim:
            raise ValueError(f"dim {dim} does not match the model's embedding dimension {identity.dim}")
        self.dim = int(dim)
        self.identity = identity
        self.approximate = approximate
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.use_gpu = use_gpu
        self.info: dict = {}
        self._emb: list[np.ndarray] = []
        self._norms: list[np.ndarray] = []
        self._offsets = [0]
        self._paths: list[str] = []
        self._path_set: set[str] = set()
        self._flat = None
        self._flat_gpu = False
        self._gpu_res = None
        self._hnsw = None
        self._hnsw_file: Path | None = None
        self._hnsw_count = 0  # rows the stored graph must hold

    # -- contents -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) float32; the memory map itself right after loading, a copy once items were added."""
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
        """Embeddings of the given item ids, (len(ids), D) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError("item id out of range")
        out = np.empty((ids.size, self.dim), np.float32)
        chunk = np.searchsorted(np.asarray(self._offsets), ids, side="right") - 1
        for c in np.unique(chunk):
            sel = np.nonzero(chunk == c)[0]
            out[sel] = self._emb[c][ids[sel] - self._offsets[c]]
        return out

    def _row_norms(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        norms = self.norms
        return np.asarray(norms[ids], dtype=np.float64)

    # -- model ----------------------------------------------------------------------------------
    def attach(self, model) -> Index:
        """Uses ``model`` to embed images from now on; it must be the model that built the index."""
        ident = ModelIdentity.of(model)
        if self.identity is not None:
            self.identity.check(ident)
        elif ident.dim != self.dim:
            raise ValueError(f"model embeds in dimension {ident.dim}, the index holds dimension {self.dim}")
        else:
            self.identity = ident
        self.model = model
        return self

    def _need_model(self, what: str):
        if self.model is None:
            raise ValueError(
                f"{what}: images need a model (Index(model) or index.attach(model)); or pass embeddings"
            )
        return self.model

    def _plain(self) -> bool:
        return self.identity is not None and self.identity.embedding == "plain"

    # -- adding ---------------------------------------------------------------------------------
    def add(self, items, paths=None, *, norms=None, batch_size: int = 32) -> None:
        """Adds images (B, 3, S, S) in [0, 1] (embedded by the attached model) or unit-norm
        embeddings (B, D), with their names (default ``item-<id>``; names must be unique).

        Embeddings given directly must come from the certified float32 path
        (:meth:`lipsim.LipSim.embed`): the index cannot tell where vectors came from, and radii
        computed over ``embed_fast`` (bf16) vectors promise nothing."""
        if isinstance(items, torch.Tensor) and items.dim() == 4:
            emb, fnorms = embed_images(self._need_model("add"), items, batch_size)
        else:
            emb = _as_float_array(items, "embeddings")
            fnorms = None
            if norms is not None:
                fnorms = np.asarray(norms.cpu() if isinstance(norms, torch.Tensor) else norms, np.float32)
                if fnorms.shape != (emb.shape[0],):
                    raise ValueError(f"norms must have shape ({emb.shape[0]},), got {fnorms.shape}")
        self._append(emb, fnorms, paths)

    def _append(self, emb: np.ndarray, fnorms: np.ndarray | None, paths) -> None:
        n = emb.shape[0]
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {emb.shape[-1]}, the index holds {self.dim}")
        _check_unit(emb, "embeddings")
        if fnorms is not None:
            _check_norms(fnorms, "norms")
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
            return
        if fnorms is None:
            fnorms = np.full((n,), np.nan, np.float32)
        self._emb.append(emb)
        self._norms.append(np.asarray(fnorms, np.float32))
        self._offsets.append(self._offsets[-1] + n)
        self._paths.extend(paths)
        self._path_set |= new
        if self._flat is not None:
            self._flat.add(emb)
        if self._hnsw is not None:
            self._hnsw.add(emb)

    # -- FAISS ----------------------------------------------------------------------------------
    def _blocks(self, start: int = 0):
        for c, arr in enumerate(self._emb):
            lo = self._offsets[c]
            if lo + arr.shape[0] <= start:
                continue
            begin = max(0, start - lo)
            for s in range(begin, arr.shape[0], _ADD_BLOCK):
                yield np.ascontiguousarray(arr[s : s + _ADD_BLOCK], dtype=np.float32)

    def _ensure_flat(self):
        if self._flat is None:
            import faiss

            index = faiss.IndexFlatIP(self.dim)
            for block in self._blocks():
                index.add(block)
            want_gpu = self.use_gpu if self.use_gpu is not None else faiss.get_num_gpus() > 0
            if want_gpu and hasattr(faiss, "StandardGpuResources"):
                self._gpu_res = faiss.StandardGpuResources()
                options = faiss.GpuClonerOptions()
                options.useFloat16 = False
                index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index, options)
                self._flat_gpu = True
            self._flat = index
        return self._flat

    def _ensure_hnsw(self):
        if self._hnsw is None:
            import faiss

            index = None
            if self._hnsw_file is not None and self._hnsw_file.exists():
                index = self._read_hnsw(faiss)
            if index is None:
                index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = self.ef_construction
            for block in self._blocks(start=index.ntotal):
                index.add(block)
            self._hnsw = index
        return self._hnsw

    def _read_hnsw(self, faiss):
        """The stored graph, refused unless it is an inner-product HNSW graph of this index's rows."""
        file = self._hnsw_file
        try:
            index = faiss.read_index(str(file))
        except Exception as exc:  # faiss raises RuntimeError for damaged files
            why = _first_line(exc).split("Error: ", 1)[-1]
            raise IndexFormatError(f"{file}: damaged HNSW graph ({why})") from None
        if not _graph_ok(faiss, index, self.dim, self._hnsw_count):
            raise IndexFormatError(f"{file}: not a valid HNSW graph of this index's {self._hnsw_count} rows")
        return index

    def build(self) -> None:
        """Builds the search structures now instead of at the first search."""
        if len(self):
            self._ensure_flat() if self.approximate is None else self._ensure_hnsw()

    # -- searching ------------------------------------------------------------------------------
    def _queries(self, queries, ref_norms):
        if isinstance(queries, torch.Tensor) and queries.dim() == 4:
            q, qn = embed_images(self._need_model("search"), queries)
            return q, qn.astype(np.float64)
        q = _as_float_array(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index holds {self.dim}")
        unit = np.abs(np.linalg.norm(q.astype(np.float64), axis=1) - 1.0)
        if unit.size and unit.max() > UNIT_TOL:
            raise ValueError(f"query embeddings must have unit norm (worst |‖e‖ - 1| = {unit.max():.2e})")
        qn = None if ref_norms is None else np.asarray(ref_norms, np.float64).reshape(-1)
        if qn is not None and qn.shape[0] != q.shape[0]:
            raise ValueError("ref_norms must hold one norm per query")
        return q, qn

    def search(
        self,
        queries,
        k: int = 10,
        *,
        certify_k: int | None = None,
        exact: bool | None = None,
        rerank: int | None = None,
        ref_norms=None,
    ) -> list[SearchResult]:
        """The k nearest items of each query, with a certified top-1 radius.

        ``queries``: images (B, 3, S, S) in [0, 1] (embedded by the attached model) or unit
        embeddings (B, D). ``certify_k``: how many exact candidates the certificate looks at
        (default max(k, 32); more candidates give a larger radius; with ``certify_k = 1`` the
        radius is 0, as the top-1 alone bounds nothing). ``exact``: default True for exact indexes,
        False for approximate ones. ``rerank``: for approximate search, fetch this many
        candidates and certify within them. ``ref_norms``: ‖f(query)‖ for plain-mode models when
        passing embeddings (images provide it themselves).
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        n = len(self)
        if n == 0:
            raise ValueError("the index is empty")
        q, qn = self._queries(queries, ref_norms)
        use_exact = self.approximate is None if exact is None else bool(exact)
        if use_exact:
            n_cand = min(n, max(k, certify_k or CERTIFY_K))
            ip, ids = self._ensure_flat().search(q, n_cand)
            allowance = search_allowance(self.dim, reduced_precision=self._flat_gpu)
        else:
            n_cand = min(n, max(k, rerank or 0))
            hnsw = self._ensure_hnsw()
            hnsw.hnsw.efSearch = max(self.ef_search, n_cand)
            ip, ids = hnsw.search(q, n_cand)
        out = []
        for i in range(q.shape[0]):
            valid = ids[i] >= 0
            cand = ids[i][valid].astype(np.int64)
            g = self.rows(cand).astype(np.float64)
            dist = 1.0 - g @ q[i].astype(np.float64)
            order = np.argsort(dist, kind="stable")
            cand, g, dist = cand[order], g[order], dist[order]
            ref_norm = None
            note = ""
            radius: float | None
            if self._plain():
                ref_norm = None if qn is None else float(qn[i])
            if self._plain() and ref_norm is None:
                radius, scope = None, "none"
                note = "plain-mode model: a certificate needs ‖f(query)‖ (search images, or pass ref_norms)"
            elif use_exact:
                beyond = None if cand.size >= n else 1.0 - float(ip[i][valid][-1]) - allowance
                radius, scope = top1_radius(dist, g, beyond=beyond, ref_norm=ref_norm), "gallery"
            elif rerank:
                radius, scope = top1_radius(dist, g, beyond=None, ref_norm=ref_norm), "candidates"
                note = (
                    "approximate search re-ranked exactly: the radius certifies the top-1 among the "
                    f"{cand.size} retrieved candidates only, not against the whole gallery"
                )
            else:
                radius, scope = None, "none"
                note = "approximate (HNSW) search: not certifiable (use rerank, or exact search)"
            out.append(
                SearchResult(
                    ids=cand[:k],
                    paths=[self._paths[j] for j in cand[:k]],
                    distances=np.clip(dist[:k], 0.0, 2.0),  # rounding can dip below 0
                    certified_radius=radius,
                    scope=scope,
                    note=note,
                    candidates=int(cand.size),
                )
            )
        return out

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Writes the index directory: the data files of a new generation (each atomically), then
        meta.json, which points at them, then removes the files of other generations. Interrupted
        at any point, the directory still holds the previous index (or the new one), never a mix."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        n = len(self)
        generation = secrets.token_hex(6)

        def write_embeddings(tmp):
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, self.dim))
            row = 0
            for block in self._blocks():
                arr[row : row + block.shape[0]] = block
                row += block.shape[0]
            arr.flush()
            del arr

        atomic_write(_data_file(path, "embeddings", generation), write_embeddings)
        write_npy_atomic(_data_file(path, "norms", generation), np.asarray(self.norms, np.float32))
        write_text_atomic(_data_file(path, "paths", generation), json.dumps(self._paths, ensure_ascii=False))
        hnsw_file = _data_file(path, "hnsw", generation)
        if self.approximate == "hnsw" and n:
            import faiss

            hnsw = self._ensure_hnsw()
            atomic_write(hnsw_file, lambda tmp: faiss.write_index(hnsw, tmp))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": generation,
            "count": n,
            "dim": self.dim,
            "model": None if self.identity is None else self.identity.as_dict(),
            "approximate": None
            if self.approximate is None
            else {
                "kind": self.approximate,
                "M": self.hnsw_m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            },
            "info": self.info,
        }
        write_text_atomic(path / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False))
        for file in path.iterdir():  # other generations and the version-1 names
            match = _DATA_FILE.fullmatch(file.name)
            if match and match[2] != f"-{generation}":
                with contextlib.suppress(OSError):  # a leftover is harmless: nothing refers to it
                    file.unlink()
        self._hnsw_file, self._hnsw_count = hnsw_file, n
        return path

    @staticmethod
    def is_index(path) -> bool:
        meta = Path(path) / "meta.json"
        if not meta.is_file():
            return False
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError, RecursionError):
            return False

    @classmethod
    def load(cls, path, model=None, *, mmap: bool = True, use_gpu: bool | None = None) -> Index:
        """Opens an index directory; embeddings are memory-mapped (``mmap=True``). With ``model``,
        refuses (:class:`~lipsim.retrieval.ModelMismatchError`) unless it built the index. Anything
        damaged or out of format (meta.json fields, file headers, embeddings that are not finite
        unit vectors, negative or infinite norms) is an :class:`IndexFormatError` naming the path."""
        path = Path(path)
        if not path.is_dir():
            raise IndexFormatError(f"{path}: no such index directory")
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            unfinished = (path / "partial").is_dir()
            hint = " (an unfinished build: rerun 'lipsim index' to complete it)" if unfinished else ""
            raise IndexFormatError(f"{path}: not a lipsim index (no meta.json){hint}") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise IndexFormatError(f"{path}/meta.json: unreadable ({_first_line(exc)})") from None
        try:
            n, dim, generation, identity, settings, info = _check_meta(meta)
            index = cls(dim=dim, identity=identity, use_gpu=use_gpu, **settings)
        except ValueError as exc:
            raise IndexFormatError(f"{path}/meta.json: {_first_line(exc)}") from None
        files = {name: _data_file(path, name, generation) for name in _SUFFIX}
        names = {name: file.name for name, file in files.items()}
        try:
            emb = np.load(files["embeddings"], mmap_mode="r" if mmap else None, allow_pickle=False)
            norms = np.load(files["norms"], allow_pickle=False)
            paths = json.loads(files["paths"].read_text(encoding="utf-8"))
        except MemoryError:
            raise
        except Exception as exc:  # numpy raises many kinds for damaged headers
            raise IndexFormatError(f"{path}: damaged index ({_first_line(exc)})") from None
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape != (n, dim):
            raise IndexFormatError(
                f"{path}: {names['embeddings']} is {emb.dtype} {emb.shape}, meta says float32 ({n}, {dim})"
            )
        if norms.shape != (n,) or not isinstance(paths, list) or len(paths) != n:
            raise IndexFormatError(f"{path}: {names['norms']}/{names['paths']} do not hold {n} entries")
        if not all(isinstance(p, str) for p in paths):
            raise IndexFormatError(f"{path}: {names['paths']} must hold strings")
        try:
            _check_norms(norms, names["norms"])
            _check_unit(emb, names["embeddings"])
        except ValueError as exc:
            raise IndexFormatError(f"{path}: {exc}") from None
        index.info = info
        if n:
            index._emb.append(emb)
            index._norms.append(norms.astype(np.float32))
            index._offsets.append(n)
            index._paths = paths
            index._path_set = set(index._paths)
            if len(index._path_set) != n:
                raise IndexFormatError(f"{path}: {names['paths']} holds duplicate names")
        if index.approximate:
            index._hnsw_file, index._hnsw_count = files["hnsw"], n
        if model is not None:
            index.attach(model)
        return index
