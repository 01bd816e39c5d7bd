"""Near-duplicate detection with certified verdicts.

Two images are *near duplicates* when ``d < T``. Groups are the **connected components** of that
relation (single linkage): a chain a~b, b~c puts a, b and c together even if ``d(a, c) ≥ T``;
use ``T`` small enough that chains are what you want, or read the pairs, which are exact.

Certificates (:func:`lipsim.retrieval.certificate.pair_threshold_radius`): each listed pair
carries the ℓ2 radius within which its verdict ("below" or "above" T) cannot change when one of
its two images is perturbed (append mode without the norm-aware bound: also when both are, as
long as the two norms sum to less). Listed are all pairs closer than a *reach* computed from
``eps``: every pair farther away has an "above" verdict whose radius exceeds ``eps``
(certify.distance_interval), so listing them would add nothing at that budget. The grouping as
a whole does not change under a perturbation of any single image with norm below
``certified_radius = min(eps, smallest listed radius)`` (a lower bound; it is capped at ``eps``
because the unlisted pairs are only known to exceed ``eps``); each group has the same number
over the pairs that touch it.

Search: FAISS exact range search on the unit embeddings finds the candidate pairs with a
float32 allowance (:func:`~lipsim.retrieval.certificate.search_allowance`) so none is missed;
their distances are then recomputed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import certify
from ..errors import LipSimError
from .certificate import pair_threshold_radius, search_allowance, threshold_reach
from .store import check_unit

__all__ = ["PairVerdict", "DedupResult", "find_near_duplicates"]


@dataclass
class PairVerdict:
    """One pair of images: its distance, which side of T it is on, and the certified radius."""

    i: int
    j: int
    a: str
    b: str
    distance: float
    below: bool
    radius: float

    def as_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "distance": self.distance,
            "verdict": "below" if self.below else "above",
            "radius": self.radius,
        }


@dataclass
class DedupResult:
    threshold: float
    eps: float
    reach: float
    n_images: int
    groups: list[list[str]]
    group_radii: list[float]
    pairs: list[PairVerdict]
    certified_radius: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "eps": self.eps,
            "n_images": self.n_images,
            "groups": [
                {"paths": g, "certified_radius": r}
                for g, r in zip(self.groups, self.group_radii, strict=True)
            ],
            "pairs": [p.as_dict() for p in self.pairs],
            "certified_radius": self.certified_radius,
            "certified_at_eps": all(p.radius > self.eps for p in self.pairs),
            "listed_up_to_distance": self.reach,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _components(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def find_near_duplicates(
    embeddings: np.ndarray,
    paths: list[str],
    threshold: float,
    *,
    eps: float = 36 / 255,
    norms: np.ndarray | None = None,
    max_pairs: int = 1_000_000,
    embedding: str | None = None,
) -> DedupResult:
    """Groups the items whose distance is below ``threshold`` and certifies every listed verdict.

    ``embeddings``: (N, D) unit float32; ``norms``: ‖f(x)‖ per item for a plain-mode model (the
    radii then use the norm-aware bound), ``None`` for append mode. ``embedding="append"``
    (embeddings of an append-mode model) reads each ‖f(x)‖ off its embedding
    (:func:`lipsim.certify.append_norm_from_embedding`) and uses the norm-aware bound too, for one
    image perturbed at a time; left out, append-mode radii use ρ(ε) = ε.
    """
    import faiss

    if not 0.0 < threshold < 2.0:
        raise ValueError("the threshold must lie in (0, 2) (distances are 1 - cosine)")
    eps = certify.check_eps(eps)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
    check_unit(emb, "embeddings")  # a certificate on anything else would be void
    n = emb.shape[0]
    if len(paths) != n:
        raise ValueError(f"{n} embeddings but {len(paths)} paths")
    if norms is not None:
        norms = np.asarray(norms, np.float64)
        if norms.shape != (n,) or not np.isfinite(norms).all() or (norms < 0).any():
            raise ValueError("plain-mode certificates need the feature norm ‖f(x)‖ of every image")
    mode = embedding or ("plain" if norms is not None else "append")
    if embedding == "append":
        norms = certify.append_norm_from_embedding(emb.astype(np.float64))
    reach = threshold_reach(threshold, eps, None if norms is None or n == 0 else float(norms.min()), mode)
    pairs: list[PairVerdict] = []
    if n >= 2:
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        lims, _, ids = index.range_search(emb, float(1.0 - reach - search_allowance(emb.shape[1])))
        rows = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
        keep = rows < ids
        ii, jj = rows[keep].astype(np.int64), ids[keep].astype(np.int64)
        if ii.size > max_pairs:
            raise LipSimError(
                f"{ii.size} pairs lie within distance {reach:.4f}; lower --threshold or --eps "
                f"(limit {max_pairs})"
            )
        e64 = emb.astype(np.float64)
        d = 1.0 - np.einsum("ij,ij->i", e64[ii], e64[jj])
        near = d < reach
        ii, jj, d = ii[near], jj[near], d[near]
        order = np.lexsort((jj, ii, d))
        ii, jj, d = ii[order], jj[order], d[order]
        radii = pair_threshold_radius(d, threshold, None if norms is None else (norms[ii], norms[jj]), mode)
        for i, j, dist, r in zip(ii.tolist(), jj.tolist(), d.tolist(), radii.tolist(), strict=True):
            pairs.append(
                PairVerdict(
                    i, j, paths[i], paths[j], min(max(float(dist), 0.0), 2.0), dist < threshold, float(r)
                )
            )
    comps = _components(n, [(p.i, p.j) for p in pairs if p.below])
    comps = sorted((sorted(c, key=lambda k: paths[k]) for c in comps), key=lambda c: paths[c[0]])
    touching: dict[int, float] = {}
    for p in pairs:
        for k in (p.i, p.j):
            touching[k] = min(touching.get(k, eps), p.radius)
    group_radii = [min([eps] + [touching.get(k, eps) for k in c]) for c in comps]
    certified = min([eps] + [p.radius for p in pairs])
    return DedupResult(
        threshold=float(threshold),
        eps=float(eps),
        reach=float(reach),
        n_images=n,
        groups=[[paths[k] for k in c] for c in comps],
        group_radii=group_radii,
        pairs=pairs,
        certified_radius=float(certified),
    )
