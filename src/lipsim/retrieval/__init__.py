"""Retrieval with LipSim: certified nearest-neighbour search and near-duplicate detection.

* :class:`Index`: embeddings of a gallery (memory-mapped on disk), exact FAISS inner-product
  search with a certified top-1 radius, an approximate HNSW option (not certifiable unless its
  candidates are re-ranked exactly, and then only among them), incremental ``add``.
* :func:`index_folder`: resumable, chunked embedding of a directory tree into an index.
* :func:`find_near_duplicates`: groups of images closer than a threshold, each verdict with the
  radius within which it cannot change.
* :mod:`.certificate`: the radii (derivations in the docstrings); :mod:`.attack`: ℓ2-PGD attacks
  that try to break them.

Radii are ℓ2 norms in the [0, 1] pixel space of the 224×224 input (docs/retrieval.md).
"""

from __future__ import annotations

from .build import BuildReport, FolderEmbeddings, embed_folder, index_folder, list_images
from .certificate import pair_threshold_radius, search_allowance, threshold_reach, top1_radius
from .dedup import DedupResult, PairVerdict, find_near_duplicates
from .identity import ModelIdentity, ModelMismatchError, weights_sha256
from .index import Index, IndexFormatError, SearchResult, embed_images

__all__ = [
    "BuildReport",
    "DedupResult",
    "FolderEmbeddings",
    "Index",
    "IndexFormatError",
    "ModelIdentity",
    "ModelMismatchError",
    "PairVerdict",
    "SearchResult",
    "embed_folder",
    "embed_images",
    "find_near_duplicates",
    "index_folder",
    "list_images",
    "pair_threshold_radius",
    "search_allowance",
    "threshold_reach",
    "top1_radius",
    "weights_sha256",
]
