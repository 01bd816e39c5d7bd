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
index is refused (:class:`IndexFormatError`) instead of producing wrong certificates. Rows, files
and generations are :mod:`lipsim.retrieval.store`'s; this module searches and certifies.

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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import certify
from ..embedding import normalise
from ..fileio import atomic_write
from .certificate import search_allowance, top1_radius
from .identity import ModelIdentity
from .store import (
    FORMAT,
    FORMAT_VERSION,
    UNIT_TOL,
    EmbeddingStore,
    IndexFormatError,
    check_meta,
    data_file,
    first_line,
    is_index,
    is_int,
    read_graph,
    read_meta,
    short,
)

__all__ = ["Index", "SearchResult", "IndexFormatError", "embed_images"]
#: re-exported from the store (the file format and its tolerance)
_STORE_NAMES = (FORMAT, FORMAT_VERSION, UNIT_TOL)

#: HNSW settings, inclusive integer ranges (M < 2 crashes FAISS; a huge efSearch exhausts memory)
HNSW_LIMITS = {"M": (2, 1024), "ef_construction": (1, 1 << 20), "ef_search": (1, 1 << 20)}
#: default number of exact candidates examined by the top-1 certificate
CERTIFY_K = 32


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
    model = model.freeze()  # weights folded once for every batch
    for start in range(0, images.shape[0], batch_size):
        f = model.features(images[start : start + batch_size])
        embs.append(normalise(f, model.embedding).cpu().numpy().astype(np.float32))
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
            if not is_int(value, lo, hi):
                raise ValueError(f"HNSW {key} must be an integer in [{lo}, {hi}], got {short(value)}")
        self.model = None
        if model is not None:
            identity = ModelIdentity.of(model)
            dim = identity.dim
            self.model = model
        if dim is None:
            if identity is None:
                raise ValueError("Index needs a model, a dim or an identity")
            dim = identity.dim
        if not is_int(dim, 1, 1 << 31):
            raise ValueError(f"dim must be a positive integer, got {short(dim)}")
        if identity is not None and identity.dim != dim:
            raise ValueError(f"dim {dim} does not match the model's embedding dimension {identity.dim}")
        self.dim = int(dim)
        self.identity = identity
        self.approximate = approximate
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.use_gpu = use_gpu
        self.info: dict = {}
        self.store = EmbeddingStore(self.dim)
        self._flat = None
        self._flat_gpu = False
        self._gpu_res = None
        self._hnsw = None
        self._hnsw_file: Path | None = None
        self._hnsw_count = 0  # rows the stored graph must hold

    # -- contents (held by the store) ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store)

    @property
    def paths(self) -> list[str]:
        return self.store.paths

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) float32; the memory map itself right after loading, a copy once items were added."""
        return self.store.embeddings

    @property
    def norms(self) -> np.ndarray:
        return self.store.norms

    def rows(self, ids) -> np.ndarray:
        """Embeddings of the given item ids, (len(ids), D) float32."""
        return self.store.rows(ids)

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

    def _mode(self) -> str:
        return "plain" if self._plain() else "append"

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
        self.append(emb, fnorms, paths)

    def append(self, emb: np.ndarray, norms: np.ndarray | None = None, paths=None) -> None:
        """Adds rows of unit float32 embeddings (N, D) with their feature norms (or None) and
        names, checked by :meth:`EmbeddingStore.append` (shapes, finite unit rows, norms, unique
        names); the search structures built so far take them too."""
        if self.store.append(emb, norms, paths) == 0:
            return
        if self._flat is not None:
            self._flat.add(emb)
        if self._hnsw is not None:
            self._hnsw.add(emb)

    _append = append  # the name used before the store was split off

    # -- FAISS ----------------------------------------------------------------------------------
    def _ensure_flat(self):
        if self._flat is None:
            import faiss

            index = faiss.IndexFlatIP(self.dim)
            for block in self.store.blocks():
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
                index = read_graph(self._hnsw_file, self.dim, self._hnsw_count)
            if index is None:
                index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = self.ef_construction
            for block in self.store.blocks(start=index.ntotal):
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
            return q, qn.astype(np.float64), True
        q = _as_float_array(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index holds {self.dim}")
        unit = np.abs(np.linalg.norm(q.astype(np.float64), axis=1) - 1.0)
        if unit.size and unit.max() > UNIT_TOL:
            raise ValueError(f"query embeddings must have unit norm (worst |‖e‖ - 1| = {unit.max():.2e})")
        qn = None if ref_norms is None else np.asarray(ref_norms, np.float64).reshape(-1)
        if qn is not None and qn.shape[0] != q.shape[0]:
            raise ValueError("ref_norms must hold one norm per query")
        return q, qn, False

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
        passing embeddings (images provide it themselves). Append-mode indexes of a named model
        certify with the norm-aware bound (docs/method.md §4.1), taking ‖f(query)‖ from the forward
        pass or, for a query embedding, from the embedding itself.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        n = len(self)
        if n == 0:
            raise ValueError("the index is empty")
        q, qn, from_images = self._queries(queries, ref_norms)
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
            note = ""
            radius: float | None
            if self._plain() or (from_images and self.identity is not None):
                ref_norm = None if qn is None else float(qn[i])  # ‖f(query)‖ of the forward pass
            elif self.identity is not None:  # an append-mode query embedding holds ‖f(query)‖
                ref_norm = float(certify.append_norm_from_embedding(q[i : i + 1].astype(np.float64))[0])
            else:  # embeddings of an unnamed model: the bound without the norm (ρ = ε)
                ref_norm = None
            if self._plain() and ref_norm is None:
                radius, scope = None, "none"
                note = "plain-mode model: a certificate needs ‖f(query)‖ (search images, or pass ref_norms)"
            elif use_exact:
                beyond = None if cand.size >= n else 1.0 - float(ip[i][valid][-1]) - allowance
                radius, scope = (
                    top1_radius(dist, g, beyond=beyond, ref_norm=ref_norm, embedding=self._mode()),
                    "gallery",
                )
            elif rerank:
                radius, scope = (
                    top1_radius(dist, g, beyond=None, ref_norm=ref_norm, embedding=self._mode()),
                    "candidates",
                )
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
                    paths=[self.store.path(j) for j in cand[:k]],
                    distances=np.clip(dist[:k], 0.0, 2.0),  # rounding can dip below 0
                    certified_radius=radius,
                    scope=scope,
                    note=note,
                    candidates=int(cand.size),
                )
            )
        return out

    # -- persistence (files and generations: the store) ----------------------------------------
    def save(self, path) -> Path:
        """Writes the index directory: the data files of a new generation (each atomically), then
        meta.json, which points at them, then removes the files of other generations. Interrupted
        at any point, the directory still holds the previous index (or the new one), never a mix."""
        path = Path(path)
        write_graph = None
        if self.approximate == "hnsw" and len(self):
            import faiss

            def write_graph(file: Path) -> None:
                hnsw = self._ensure_hnsw()
                atomic_write(file, lambda tmp: faiss.write_index(hnsw, tmp))

        settings = None
        if self.approximate is not None:
            settings = {
                "kind": self.approximate,
                "M": self.hnsw_m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            }
        meta = {
            "model": None if self.identity is None else self.identity.as_dict(),
            "approximate": settings,
            "info": self.info,
        }
        self._hnsw_file = self.store.save(path, meta, write_graph)
        self._hnsw_count = len(self)
        return path

    @staticmethod
    def is_index(path) -> bool:
        return is_index(path)

    @classmethod
    def load(cls, path, model=None, *, mmap: bool = True, use_gpu: bool | None = None) -> Index:
        """Opens an index directory; embeddings are memory-mapped (``mmap=True``). With ``model``,
        refuses (:class:`~lipsim.retrieval.ModelMismatchError`) unless it built the index. Anything
        damaged or out of format (meta.json fields, file headers, embeddings that are not finite
        unit vectors, negative or infinite norms) is an :class:`IndexFormatError` naming the path."""
        path = Path(path)
        meta = read_meta(path)
        try:
            n, dim, generation, identity, settings, info = check_meta(meta)
            index = cls(dim=dim, identity=identity, use_gpu=use_gpu, **settings)
        except ValueError as exc:
            raise IndexFormatError(f"{path}/meta.json: {first_line(exc)}") from None
        index.store = EmbeddingStore.load(path, n, dim, generation, mmap)
        index.info = info
        if index.approximate:
            index._hnsw_file, index._hnsw_count = data_file(path, "hnsw", generation), n
        if model is not None:
            index.attach(model)
        return index
