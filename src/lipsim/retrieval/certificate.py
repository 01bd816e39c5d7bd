"""Certificates for retrieval: a stable nearest neighbour and a stable duplicate verdict.

Pure functions on embeddings and distances (float64, built on :mod:`lipsim.certify`); no
index, no model. Notation as in docs/method.md §1 and §3: ``g`` is the unit-norm embedding,
``d(x, y) = 1 - ⟨g(x), g(y)⟩``, every radius an ℓ2 norm in the [0, 1] pixel space of the query.

**Top-1 under a perturbed query** (:func:`top1_radius`). Let ``a`` be the gallery item nearest
to the query ``q`` and ``b`` any other item. "a is closer to q than b" is a 2AFC decision with
``q`` as the reference and ``a``, ``b`` as the two candidates, so it cannot flip for
``‖δ‖ < radius_ab = (d_b - d_a)/‖g(a) - g(b)‖`` (:func:`lipsim.certify.radius_2afc`; the
margin ``Δ(q) = ⟨g(q), g(a) - g(b)⟩`` moves by at most ``‖g(q+δ) - g(q)‖·‖g(a) - g(b)‖``; with
the norm-aware movement bound, ``ρ⁻¹`` of that ratio, where ‖f(q)‖ is read off the query's own
append-mode embedding, :func:`lipsim.certify.append_norm_from_embedding`). The
top-1 stays ``a`` while every such decision holds, so the certified radius is the minimum over
the rivals. An exact top-K search gives the rivals ranked 2..K explicitly. Every item beyond
the K-th satisfies ``d_b ≥ d_K`` and ``‖g(a) - g(b)‖ ≤ 2`` (unit vectors), so its own radius is at
least ``(d_K - d_a)/2``: one term covers the whole unseen rest of the gallery. Hence

    certified_radius = min( min_{b = 2..K} radius_ab , (d_K - d_a)/2 )

with the second term dropped when the K candidates are the whole gallery (a gallery of one item
has an unbounded radius). Ties (``d_b = d_a``, or within the float slack) give 0. For models
with plain normalisation (the published checkpoints) g is not 1-Lipschitz; each term then comes
from :func:`lipsim.certify.radius_2afc_plain` with ``r = ‖f(q)‖`` (the same decision, with the
norm-aware movement bound), never from the optimistic ``m/B``.

**Rounding of the search itself.** The search backend (FAISS) ranks with float32 inner
products. For unit vectors of dimension D any float32 evaluation order errs by at most
``γ_D = D·u/(1 - D·u)`` (u = 2⁻²⁴) times ``Σ|q_i b_i| ≤ 1``, so "every unseen item has
``d_b ≥ d_K``" is used as ``d_b ≥ d_K^{float32} - allowance`` (:func:`search_allowance`), and
the distances of the K candidates themselves are recomputed in float64 from the stored
embeddings before anything is certified.

**Threshold verdicts** (:func:`pair_threshold_radius`): "d(x, y) < T" (or ≥ T) for a pair,
one image perturbed; :func:`lipsim.certify.radius_threshold` in append mode. In plain mode that
function's value is the allowed movement of ``g`` (the margin), turned into an input radius by
the inverse of the norm-aware movement bound ρ, taking the worse of the two images' norms.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import certify

__all__ = ["top1_radius", "pair_threshold_radius", "search_allowance", "threshold_reach"]

_U32 = 2.0**-24


def search_allowance(dim: int, reduced_precision: bool = False) -> float:
    """Bound on |float32 inner product - exact| for unit vectors of dimension ``dim``.

    ``reduced_precision`` adds 2⁻¹⁰ for backends that may round their inputs to TF32 (10-bit
    mantissa: each factor relative error ≤ 2⁻¹¹), which a GPU BLAS is allowed to do.
    """
    du = dim * _U32
    allowance = du / (1.0 - du) * 1.0001 + 1e-12
    if reduced_precision:
        allowance += 2.0**-10
    return allowance


def _radius_with_separation(
    d_near: torch.Tensor,
    d_far: torch.Tensor,
    separation,
    ref_norm: torch.Tensor | None,
    embedding: str = "plain",
) -> torch.Tensor:
    """2AFC radius for rivals at distance ``d_far`` whose embeddings are at most ``separation``
    (a number or one per rival) from the top-1's. The certify functions use g0, g1 only through
    ``B = ‖g0 - g1‖``, so two 1-d vectors ±separation/2 (whose difference is exactly
    ``separation`` in floating point) stand for the rivals; B is then rounded up there."""
    n = d_near.shape[0]
    sep = torch.as_tensor(separation, dtype=torch.float64).expand(n)
    g0 = (sep / 2).reshape(n, 1)
    g1 = -g0
    if ref_norm is None:
        return certify.radius_2afc(d_near, d_far, g0, g1).double()
    if embedding == "append":
        return certify.radius_2afc(d_near, d_far, g0, g1, ref_norm.expand(n)).double()
    return certify.radius_2afc_plain(d_near, d_far, g0, g1, ref_norm.expand(n)).double()


def top1_radius(
    distances: np.ndarray | torch.Tensor,
    embeddings: np.ndarray | torch.Tensor,
    beyond: float | None = None,
    ref_norm: float | None = None,
    embedding: str | None = None,
) -> float:
    """Certified ℓ2 radius of the top-1 among candidates, for perturbations of the query.

    ``distances``: (K,) distances of the candidates to the query, ascending, computed in float64
    from the stored embeddings; ``embeddings``: (K, D) their unit embeddings (same order);
    ``beyond``: a lower bound on the distance of every gallery item that is not a candidate
    (``None`` when the candidates are the whole gallery); ``ref_norm``: ‖f(query)‖, required for a
    plain-mode model; ``embedding``: "append" or "plain" (left out: plain when ``ref_norm`` is
    given). An append-mode model with ``ref_norm`` gets the norm-aware movement bound (larger
    radii), without it ``ρ(ε) = ε``. Returns ``math.inf`` when nothing can change the top-1 (a
    single item and no unseen rest), 0 for ties. See the module docstring.
    """
    d = torch.as_tensor(np.asarray(distances, dtype=np.float64))
    g = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    if d.dim() != 1 or g.dim() != 2 or g.shape[0] != d.shape[0]:
        raise ValueError("distances must be (K,) and embeddings (K, D) with the same K")
    if d.shape[0] == 0:
        raise ValueError("no candidates")
    if bool((d[1:] < d[:-1]).any()):
        raise ValueError("candidate distances must be sorted ascending")
    mode = embedding or ("plain" if ref_norm is not None else "append")
    if mode not in ("append", "plain"):
        raise ValueError(f"unknown embedding mode {mode!r} (choose from append, plain)")
    if mode == "plain" and ref_norm is None:
        raise ValueError("a plain-mode top-1 radius needs ref_norm = ‖f(query)‖")
    r = None if ref_norm is None else torch.tensor([float(ref_norm)], dtype=torch.float64)
    radii = []
    k = d.shape[0]
    if k > 1:
        # B_b = ‖g(a) - g(b)‖ in float64 (numpy: cheaper than a torch round trip per query)
        sep = np.linalg.norm(g[1:].numpy() - g[:1].numpy(), axis=1)
        radii.append(_radius_with_separation(d[:1].expand(k - 1), d[1:], torch.from_numpy(sep), r, mode))
    if beyond is not None:
        far = torch.tensor([float(beyond)], dtype=torch.float64)
        if float(far) <= float(d[0]):
            return 0.0
        radii.append(_radius_with_separation(d[:1], far, 2.0, r, mode))
    if not radii:
        return math.inf
    return float(torch.cat(radii).min())


def pair_threshold_radius(
    d: np.ndarray | torch.Tensor,
    threshold: float,
    norms: tuple[np.ndarray, np.ndarray] | None = None,
    embedding: str | None = None,
) -> np.ndarray:
    """Per pair, the ℓ2 radius within which "d < threshold" (or "d ≥ threshold") cannot change
    when **one** of the two images is perturbed.

    Append mode without norms: :func:`lipsim.certify.radius_threshold` with ρ(ε) = ε. Then the
    bounds on ``d(x+δ, y)`` involve δ only through ‖g(x+δ) - g(x)‖ ≤ ‖δ‖, so the same number is
    also the budget for the *sum* ‖δ_x‖ + ‖δ_y‖ when both images move. With ``norms`` =
    (‖f(x)‖, ‖f(y)‖): that number is the distance the embedding may move, and the input radius is
    the largest ε with ρ(ε) below it (``ρ⁻¹``, norm-aware in append mode,
    :func:`lipsim.certify.inverse_movement`) for whichever image is perturbed (the minimum); one
    image at a time. ``embedding``: "append" or "plain"; left out, given norms mean plain mode.
    """
    margin = certify.radius_threshold(np.asarray(d, dtype=np.float64), threshold).astype(np.float64)
    if norms is None:
        return margin
    mode = embedding or "plain"
    radii = [certify.inverse_movement(margin, np.asarray(nm, np.float64), embedding=mode) for nm in norms]
    return np.where(margin > 0, np.minimum(*radii), 0.0)


def threshold_reach(
    threshold: float, eps: float, ref_norm_min: float | None = None, embedding: str | None = None
) -> float:
    """Distance beyond which every "≥ threshold" verdict is certified at ``eps``.

    A pair with ``d ≥ min(½(√(2T) + ρ)², T + ρ)``, ρ = ρ(eps), keeps ``d(x+δ, y) > T`` for all
    ‖δ‖ ≤ eps (the distance interval of lipsim.certify), so only closer pairs need listing.
    ``ref_norm_min``: the smallest ‖f‖ among the images (ρ is largest there: it decreases with
    ‖f‖), required in plain mode; ``embedding`` as for :func:`pair_threshold_radius`.
    """
    norm = None if ref_norm_min is None else torch.tensor([ref_norm_min], dtype=torch.float64)
    mode = embedding if norm is not None else None  # no norm: ρ(ε) = ε
    # generous by a few slacks: the certified radii shrink their margins by FLOAT_SLACK and round
    # ‖g0 - g1‖ up, so a pair exactly at the reach must still clear eps
    rho = float(certify.movement_bound(eps, norm, embedding=mode).max()) * (1 + 1e-4) + certify.FLOAT_SLACK
    reach = min(0.5 * (math.sqrt(2 * threshold) + rho) ** 2, threshold + rho)
    return min(reach + 3 * certify.FLOAT_SLACK, 2.0)
