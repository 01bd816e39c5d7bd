"""A gallery of LipSim embeddings with exact (certifiable) and approximate nearest-neighbour search.

Storage: unit-norm float32 embeddings (one row per item) with their paths, the feature norms
‖f(x)‖ (needed by plain-mode certificates) and the identity of the model that produced them. On
disk an index is a directory::

    meta.json        format, model identity, approximate settings, free-form info
    embeddings.npy   float32 (N, D), memory-mapped on load
    norms.npy        float32 (N,) ‖f(x)‖ (NaN where embeddings were added without them)
    paths.json       the N item names (relative paths)
    hnsw.faiss       the HNSW graph, only for approximate indexes

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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LipSimError
from ..fileio import atomic_write
from .certificate import search_allowance, top1_radius
from .identity import ModelIdentity

__all__ = ["Index", "SearchResult", "IndexFormatError", "embed_images"]

FORMAT = "lipsim-index"
FORMAT_VERSION = 1
#: tolerance on ‖e‖ - 1 for embeddings handed to :meth:`Index.add` directly
UNIT_TOL = 1e-4
_ADD_BLOCK = 65536
#: default number of exact candidates examined by the top-1 certificate
CERTIFY_K = 32


class IndexFormatError(LipSimError, ValueError):
    """A directory that is not a readable lipsim index."""


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
        self.model = None
        if model is not None:
            identity = ModelIdentity.of(model)
            dim = identity.dim
            self.model = model
        if dim is None:
            if identity is None:
                raise ValueError("Index needs a model, a dim or an identity")
            dim = identity.dim
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
        embeddings (B, D), with their names (default ``item-<id>``; names must be unique)."""
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
        unit = np.abs(np.linalg.norm(emb.astype(np.float64), axis=1) - 1.0)
        if n and unit.max() > UNIT_TOL:
            raise ValueError(f"embeddings must have unit norm (worst |‖e‖ - 1| = {unit.max():.2e})")
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
                loaded = faiss.read_index(str(self._hnsw_file))
                if loaded.d == self.dim and loaded.ntotal <= len(self):
                    index = loaded
            if index is None:
                index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = self.ef_construction
            for block in self._blocks(start=index.ntotal):
                index.add(block)
            self._hnsw = index
        return self._hnsw

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
        """Writes the index directory (each file replaced atomically, meta.json last)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        n = len(self)

        def write_embeddings(tmp):
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, self.dim))
            row = 0
            for block in self._blocks():
                arr[row : row + block.shape[0]] = block
                row += block.shape[0]
            arr.flush()
            del arr

        def write_npy(value):
            def write(tmp):
                with open(tmp, "wb") as fh:
                    np.save(fh, value)

            return write

        def write_text(text):
            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(text)

            return write

        atomic_write(path / "embeddings.npy", write_embeddings)
        atomic_write(path / "norms.npy", write_npy(np.asarray(self.norms, np.float32)))
        atomic_write(path / "paths.json", write_text(json.dumps(self._paths, ensure_ascii=False)))
        if self.approximate == "hnsw" and n:
            import faiss

            hnsw = self._ensure_hnsw()
            atomic_write(path / "hnsw.faiss", lambda tmp: faiss.write_index(hnsw, tmp))
        elif (path / "hnsw.faiss").exists():
            (path / "hnsw.faiss").unlink()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
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
        atomic_write(path / "meta.json", write_text(json.dumps(meta, indent=1, ensure_ascii=False)))
        return path

    @staticmethod
    def is_index(path) -> bool:
        meta = Path(path) / "meta.json"
        if not meta.is_file():
            return False
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    @classmethod
    def load(cls, path, model=None, *, mmap: bool = True, use_gpu: bool | None = None) -> Index:
        """Opens an index directory; embeddings are memory-mapped (``mmap=True``). With ``model``,
        refuses (:class:`~lipsim.retrieval.ModelMismatchError`) unless it built the index."""
        path = Path(path)
        if not path.is_dir():
            raise IndexFormatError(f"{path}: no such index directory")
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            unfinished = (path / "partial").is_dir()
            hint = " (an unfinished build: rerun 'lipsim index' to complete it)" if unfinished else ""
            raise IndexFormatError(f"{path}: not a lipsim index (no meta.json){hint}") from None
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}/meta.json: unreadable ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexFormatError(f"{path}: meta.json is not a lipsim index description")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexFormatError(f"{path}: index format {meta['format_version']} is newer than this lipsim")
        try:
            emb = np.load(path / "embeddings.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            norms = np.load(path / "norms.npy", allow_pickle=False)
            paths = json.loads((path / "paths.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: damaged index ({exc})") from None
        n, dim = int(meta.get("count", -1)), int(meta.get("dim", -1))
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape != (n, dim):
            raise IndexFormatError(
                f"{path}: embeddings.npy is {emb.dtype} {emb.shape}, meta says float32 ({n}, {dim})"
            )
        if norms.shape != (n,) or not isinstance(paths, list) or len(paths) != n:
            raise IndexFormatError(f"{path}: norms.npy/paths.json do not hold {n} entries")
        approx = meta.get("approximate")
        identity = ModelIdentity.from_dict(meta["model"]) if meta.get("model") else None
        kwargs = {}
        if approx:
            kwargs = dict(
                hnsw_m=approx.get("M", 32),
                ef_construction=approx.get("ef_construction", 80),
                ef_search=approx.get("ef_search", 128),
            )
        index = cls(
            dim=dim,
            identity=identity,
            approximate=approx["kind"] if approx else None,
            use_gpu=use_gpu,
            **kwargs,
        )
        index.info = dict(meta.get("info") or {})
        if n:
            index._emb.append(emb)
            index._norms.append(norms.astype(np.float32))
            index._offsets.append(n)
            index._paths = [str(p) for p in paths]
            index._path_set = set(index._paths)
            if len(index._path_set) != n:
                raise IndexFormatError(f"{path}: paths.json holds duplicate names")
        index._hnsw_file = path / "hnsw.faiss" if approx else None
        if model is not None:
            index.attach(model)
        return index
