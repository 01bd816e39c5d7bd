"""Certificate mathematics as pure functions on embeddings (no modules, no I/O).

Setting (docs/method.md §1, §3 and §4). ``f`` is the 1-Lipschitz backbone, ``g = z/‖z‖`` the
normalised embedding with ``z = [f; 1]`` ("append" mode, ours) or ``z = f`` ("plain" mode, the
published checkpoints). ``d(x, y) = 1 - ⟨g(x), g(y)⟩ = ½‖g(x) - g(y)‖²``.

Movement bound. Let ``ρ(ε)`` bound ``‖g(x+δ) - g(x)‖`` over ``‖δ‖₂ ≤ ε``, with ``r = ‖f(x)‖``:

* append mode (docs/method.md §4.2): z is 1-Lipschitz, ``‖z(x)‖ = √(r² + 1)`` and
  ``‖z(x+δ)‖ ≥ M(ε) = √(max(r - ε, 0)² + 1)``. Outside the ball of radius M the radial map
  ``z ↦ M·z/‖z‖`` is the projection onto that ball, which is non-expansive, so
  ``ρ(ε) = ε/M(ε) ≤ ε``. Without r (cached embeddings of unknown origin) ``M = 1``, ``ρ = ε``.
* plain mode: for non-zero a, b, ``‖â - b̂‖ ≤ ‖a - b‖/√(‖a‖‖b‖)`` and
  ``‖f(x+δ)‖ ≥ r - ε``, so ``ρ(ε) = ε/√(r(r - ε))`` for ε < r; if ``r - ε ≥ 1`` the projection
  argument gives ``ρ(ε) = ε`` as well (never smaller: ``r - ε ≥ 1`` implies ``r(r - ε) ≥ 1``, so
  that clause is a guard that does not bind); always ``ρ ≤ 2``.

Every radius is the inverse of ρ (:func:`inverse_movement`): a verdict that survives any move of
g shorter than ``k`` survives every ‖δ‖ < ρ⁻¹(k), since ρ is continuous and increasing. In append
mode ``ρ⁻¹(k) = k`` when ``k ≥ r`` and otherwise the root of ``ε² = k²((r - ε)² + 1)`` in
``[k, r]``: ``ε = k(r² + 1)/(√(r² + 1 - k²) + k·r)``.

All results are computed in float64 from float32-or-wider embeddings, and every certified
quantity is shrunk by :data:`FLOAT_SLACK`, an absolute allowance for the rounding error of the
float32 forward pass, so a radius never rests on the last bits of a float: ``r`` is lowered by
:data:`NORM_SLACK` (relative) and :data:`FLOAT_SLACK`, ``B = ‖g0 - g1‖`` rounded up, and radii
are rounded down when they are stored as float32.

The mathematics is written once, in NumPy float64, and serves both engines: the functions take
torch tensors or NumPy arrays, and return torch tensors (on the device of the first tensor
argument) when any argument is one, NumPy arrays otherwise. This module never imports torch
itself, so the torch-free command-line path (:mod:`lipsim.numpy_engine`) shares it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .embedding import normalise

__all__ = [
    "FLOAT_SLACK",
    "EMBED_SLACK",
    "TIE_TOL",
    "Certificate2AFC",
    "NORM_SLACK",
    "movement_bound",
    "inverse_movement",
    "append_norm_from_embedding",
    "radius_2afc",
    "radius_2afc_plain",
    "distance_interval",
    "radius_threshold",
    "normalise_features",
    "check_eps",
    "check_2afc_batches",
    "format_eps",
    "interval_from_features",
    "certificate_from_features",
    "pairwise_from_features",
    "pairwise_from_embeddings",
    "pairwise_from_cached",
]

#: absolute slack (in distance units) subtracted from every certified margin
FLOAT_SLACK = 1e-5
#: absolute slack on ‖g(x) - g(y)‖ computed from float32 embeddings
EMBED_SLACK = 1e-5
#: relative allowance for the rounding of ‖f(x)‖ from a float32 forward pass (lowers r)
NORM_SLACK = 1e-5
#: distances closer than this are a tie (float32 noise, not a decision)
TIE_TOL = 1e-7


@dataclass
class Certificate2AFC:
    """Result of :meth:`lipsim.LipSim.certify_2afc` (all arrays of shape (B,); torch tensors
    from the torch model, NumPy arrays from the NumPy engine).

    ``closer``: 0 if x0 is closer to the reference, 1 if x1, -1 on a tie.
    ``radius``: no ℓ2 perturbation of the reference with norm < radius changes ``closer``
    ([0, 1] pixel units of the model's input); 0 for ties.
    """

    closer: Any
    d0: Any
    d1: Any
    radius: Any

    def certified(self, eps: float):
        """Boolean mask of decisions that provably hold under every perturbation of norm ≤ eps."""
        return self.radius > eps


# -- array plumbing: torch or NumPy in, float64 NumPy inside, the caller's kind out --------------


def _is_torch(x) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch" and hasattr(x, "detach")


def _f64(x) -> np.ndarray:
    if _is_torch(x):
        torch = sys.modules["torch"]
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _template(*xs):
    """The first torch tensor among ``xs`` (results go to its device), or None."""
    return next((x for x in xs if _is_torch(x)), None)


def _out(arr: np.ndarray, like, dtype: str):
    """``arr`` as ``dtype`` ("float32", "float64", "int64", "bool"): a torch tensor on ``like``'s
    device when ``like`` is a tensor, else a NumPy array."""
    arr = np.ascontiguousarray(arr, dtype=np.dtype(dtype))
    if like is None:
        return arr
    torch = sys.modules["torch"]
    return torch.from_numpy(arr).to(like.device)


def _round32(arr: np.ndarray, toward: float) -> np.ndarray:
    """float64 bounds as float32, rounded toward ``toward`` where nearest rounding went past them."""
    arr = np.asarray(arr, dtype=np.float64)
    r32 = arr.astype(np.float32)
    past = r32.astype(np.float64) > arr if toward < np.inf else r32.astype(np.float64) < arr
    return np.where(past, np.nextafter(r32, np.float32(toward)), r32)


def _down32(arr: np.ndarray) -> np.ndarray:
    """Radii and lower bounds as float32, never above their float64 value."""
    return _round32(arr, 0.0)


def _up32(arr: np.ndarray) -> np.ndarray:
    """Upper bounds as float32, never below their float64 value."""
    return _round32(arr, np.inf)


def _norm_upper(g0: np.ndarray, g1: np.ndarray) -> np.ndarray:
    """‖g0 - g1‖ rounded up (relative 1e-6) so that dividing by it never overstates a radius."""
    return np.linalg.norm(g0 - g1, axis=-1) * (1 + 1e-6)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return num / np.maximum(den, 1e-300)


# -- the bounds -------------------------------------------------------------------------------


def _mode(embedding: str | None, ref_norm) -> str:
    """The embedding mode of a call: explicit, or (the older calling convention) plain when a
    norm is given and append when not."""
    if embedding is None:
        return "append" if ref_norm is None else "plain"
    if embedding not in ("append", "plain"):
        raise ValueError(f"unknown embedding mode {embedding!r} (choose from append, plain)")
    if embedding == "plain" and ref_norm is None:
        raise ValueError("plain-mode bounds need ref_norm = ‖f(x)‖")
    return embedding


def _lower_norm(r: np.ndarray) -> np.ndarray:
    """A lower bound on the exact ‖f(x)‖ given its float32-computed value."""
    return np.maximum(np.asarray(r, dtype=np.float64) * (1 - NORM_SLACK) - FLOAT_SLACK, 0.0)


def _movement_bound(eps, r: np.ndarray | None, embedding: str = "append") -> np.ndarray:
    eps64 = np.asarray(eps, dtype=np.float64)
    if r is None:
        return np.minimum(eps64, 2.0)
    r = _lower_norm(r)
    eps64 = np.broadcast_to(eps64, np.broadcast_shapes(eps64.shape, r.shape))
    if embedding == "append":
        return np.minimum(eps64 / np.sqrt(np.maximum(r - eps64, 0.0) ** 2 + 1.0), 2.0)
    inside = eps64 < r
    gap = np.where(inside, r - eps64, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(inside, eps64 / np.sqrt(r * gap), 2.0)
    rho = np.where(r - eps64 >= 1.0, np.minimum(rho, eps64), rho)
    return np.minimum(rho, 2.0)


def movement_bound(eps, ref_norm=None, embedding: str | None = None):
    """Upper bound ρ on ‖g(x+δ) - g(x)‖ for ‖δ‖ ≤ eps (see the module docstring), float64.

    ``ref_norm`` is ‖f(x)‖. ``embedding`` "append" (ref_norm optional: without it ρ = ε) or
    "plain" (ref_norm required); left out, a given ref_norm means plain mode.
    """
    mode = _mode(embedding, ref_norm)
    r = None if ref_norm is None else _f64(ref_norm)
    return _out(_movement_bound(_f64(eps), r, mode), _template(ref_norm, eps), "float64")


def _inverse_movement(k: np.ndarray, r: np.ndarray | None, embedding: str = "append") -> np.ndarray:
    k = np.maximum(np.asarray(k, dtype=np.float64), 0.0)
    if r is None:
        return k
    r = _lower_norm(r)
    k, r = np.broadcast_arrays(k, r)
    if embedding == "append":
        # the root of ε² = k²((r - ε)² + 1), written without the cancellation of the quadratic
        # formula (it also covers k = 1); ρ(k) ≤ k and ρ(r) = r > k put it in [k, r]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only where k ≥ r = 0, masked below
            root = k * (r * r + 1.0) / (np.sqrt(np.maximum(r * r + 1.0 - k * k, 0.0)) + k * r)
        return np.where(k < r, np.clip(root, k, r), k)
    # plain: ε* solves ε/√(r(r - ε)) = k; for ε ≤ r - 1 the projection argument gives ρ = ε
    root = r * k * (np.sqrt(k * k + 4.0) - k) / 2.0
    guard = np.minimum(k, np.maximum(r - 1.0, 0.0))
    return np.where(r > 0, np.minimum(np.maximum(root, guard), k), 0.0)


def inverse_movement(k, ref_norm=None, embedding: str | None = None):
    """The largest ε with ``ρ(ε) ≤ k`` (float64): a verdict that holds for every move of g
    shorter than k holds for every ‖δ‖ < ε. Arguments as :func:`movement_bound`."""
    mode = _mode(embedding, ref_norm)
    r = None if ref_norm is None else _f64(ref_norm)
    return _out(_inverse_movement(_f64(k), r, mode), _template(ref_norm, k), "float64")


def _append_norm(g: np.ndarray) -> np.ndarray:
    """``‖f(x)‖`` from an append-mode embedding ``g = [f; 1]/√(‖f‖² + 1)``: the ratio of the norm of
    its first entries to its last, ``r = ‖g[:-1]‖/g[-1]`` (which holds for any positive scaling of
    g, so a stored embedding that is unit only to float32 precision is fine). The numerator is
    rounded down and the denominator up (relative 1e-5 each), so r comes out low; 0 where the last
    entry is not positive."""
    g = np.asarray(g, dtype=np.float64)
    last = g[..., -1]
    head = np.linalg.norm(g[..., :-1], axis=-1) * (1 - 1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = head / (last * (1 + 1e-5))
    return np.where(last > 0, r, 0.0)


def append_norm_from_embedding(g):
    """A lower bound on ‖f(x)‖ recovered from append-mode embeddings g (N, k+1); 0 where the last
    entry is not positive (not an append-mode embedding: the bound falls back to ρ = ε).

    The certificates built on it are about an image whose embedding g is: a vector that is not a
    model's embedding of some image certifies nothing (with or without this norm)."""
    return _out(_append_norm(_f64(g)), _template(g), "float64")


def _radius_2afc(d0, d1, g0, g1, r=None, embedding: str = "append") -> np.ndarray:
    margin = np.abs(d0 - d1) - FLOAT_SLACK
    b = _norm_upper(g0, g1)
    ok = (margin > 0) & (b > 0)
    k = np.where(ok, _safe_div(np.maximum(margin, 0.0), b), 0.0)
    return np.where(ok, _inverse_movement(k, r, embedding), 0.0)


def radius_2afc(d0, d1, g0, g1, ref_norm=None):
    """Certified radius for an append-mode model (g with ``‖z‖ ≥ 1``), float32.

    ``Δ(x) = d(x, x1) - d(x, x0) = ⟨g(x), g(x0) - g(x1)⟩`` moves by at most ``‖g(x+δ) - g(x)‖·B``
    with ``B = ‖g(x0) - g(x1)‖``, hence by at most ``ρ(‖δ‖)·B``: the decision cannot flip for
    ``ρ(‖δ‖) < |d0 - d1|/B``, i.e. ``‖δ‖ < ρ⁻¹(|d0 - d1|/B)``. Without ``ref_norm`` (‖f(x_ref)‖)
    ρ(ε) = ε and the radius is ``m/B``; with it, the norm-aware ρ gives more. Ties (and anything
    within the float slack) get radius 0.
    """
    r = None if ref_norm is None else _f64(ref_norm)
    radius = _radius_2afc(_f64(d0), _f64(d1), _f64(g0), _f64(g1), r, "append")
    return _out(_down32(radius), _template(d0, d1, g0, g1, ref_norm), "float32")


def radius_2afc_plain(d0, d1, g0, g1, ref_norm):
    """Sound radius for plain normalisation (published checkpoints), docs/method.md §4.3.

    With ``m = |d0 - d1|``, ``B = ‖g0 - g1‖``, ``r = ‖f(x_ref)‖``: the decision holds while
    ``B·ρ(ε) < m``. (i) ``ρ(ε) = ε/√(r(r-ε))`` gives ``ε* = r·m·(√(m² + 4B²) - m)/(2B²)``, the
    root of ``B·ε/√(r(r-ε)) = m``; (ii) for ``ε ≤ r - 1`` the projection argument gives
    ``ρ = ε`` and ``m/B``. Radius = ``max(ε*, min(m/B, r - 1))``, capped at ``m/B``; as ρ of (i)
    never exceeds ε where (ii) applies, ε* already covers (ii), which stays as a guard.
    """
    radius = _radius_2afc(_f64(d0), _f64(d1), _f64(g0), _f64(g1), _f64(ref_norm), "plain")
    return _out(_down32(radius), _template(d0, d1, g0, g1, ref_norm), "float32")


def check_eps(eps) -> float:
    """``eps`` as a float; ValueError unless it is a non-negative real number (NaN included)."""
    try:
        value = math.nan if isinstance(eps, (str, bytes)) else float(eps)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return value


def check_2afc_batches(n_ref: int, n0: int, n1: int) -> int:
    """``n_ref`` after checking the batch sizes of a 2AFC query: x0 and x1 the same size N, the
    reference N or 1 (one reference broadcast against N pairs); ValueError otherwise."""
    if n0 != n1 or n_ref not in (1, n0):
        raise ValueError(
            f"x0 and x1 must have the same batch size and ref that size or 1, got ref {n_ref}, "
            f"x0 {n0}, x1 {n1}"
        )
    return n_ref


def format_eps(eps: float) -> str:
    """A budget or radius as users write it: ``0.1411... -> '36/255 (0.141)'`` for a multiple of
    1/255, plain decimals otherwise (``0.5 -> '0.5'``)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) % 255 != 0:
        return f"{round(k)}/255 ({eps:.3f})"
    return f"{eps:.4g}"


def _finite_features(*arrays: np.ndarray) -> None:
    for a in arrays:
        if not np.isfinite(a).all():
            raise ValueError(
                "the model produced non-finite features (NaN or inf): its weights overflow float32"
            )


def _distance_interval(d, eps, r, s, embedding: str = "append") -> tuple[np.ndarray, np.ndarray]:
    d64 = np.clip(d, 0.0, 2.0)
    rho = _movement_bound(eps, r, embedding)
    if s is None:
        s_lo = np.sqrt(2 * np.maximum(d64 - FLOAT_SLACK, 0.0))
        s_hi = np.sqrt(2 * np.minimum(d64 + FLOAT_SLACK, 2.0))
    else:
        s_lo, s_hi = np.maximum(s - EMBED_SLACK, 0.0), np.minimum(s + EMBED_SLACK, 2.0)
    d_lo, d_hi = 0.5 * s_lo**2, 0.5 * s_hi**2
    lo = np.maximum(np.maximum(0.5 * np.maximum(s_lo - rho, 0.0) ** 2, d_lo - rho), 0.0)
    hi = np.minimum(np.minimum(0.5 * (s_hi + rho) ** 2, d_hi + rho), 2.0)
    return lo, hi


def distance_interval(d, eps: float, ref_norm=None, s=None, embedding: str | None = None):
    """Interval (float32 lo, hi) holding every d(x + δ, y) with ‖δ‖ ≤ eps, given d = d(x, y).

    With ``s = ‖g(x) - g(y)‖ = √(2d)`` and the movement bound ρ, the triangle inequality gives
    ``‖g(x+δ) - g(y)‖ ∈ [s - ρ, s + ρ]``, so ``d' ∈ [½(s-ρ)₊², ½(s+ρ)²]``; also
    ``|d' - d| = |⟨g(x+δ) - g(x), g(y)⟩| ≤ ρ`` and ``0 ≤ d' ≤ 2``. The intersection is returned.
    For small d this is much tighter than ``d ± ε`` (at d = 0 it is ``[0, ½ε²]``).
    It assumes unit embeddings g(x), g(y) (always so in append mode; in plain mode unless a
    feature vector is zero, which :func:`interval_from_features` handles).

    Rounding: pass ``s`` computed from the embeddings when available; it is widened by
    :data:`EMBED_SLACK`. Without it, s is derived from d widened by :data:`FLOAT_SLACK`
    (conservative: √ amplifies the error of d near 0).

    ``ref_norm`` (‖f(x)‖) and ``embedding`` choose ρ as in :func:`movement_bound`.
    """
    eps = check_eps(eps)
    mode = _mode(embedding, ref_norm)
    r = None if ref_norm is None else _f64(ref_norm)
    lo, hi = _distance_interval(_f64(d), eps, r, None if s is None else _f64(s), mode)
    like = _template(d, ref_norm, s)
    return _out(_down32(lo), like, "float32"), _out(_up32(hi), like, "float32")


def radius_threshold(d, threshold: float, ref_norm=None, embedding: str | None = None):
    """Largest ε such that ``d(x+δ, y) < T`` (or ``> T``) keeps its side for all ‖δ‖ < ε.

    Append mode: ``d' ∈ [½(s-ρ)², ½(s+ρ)²]`` and ``|d' - d| ≤ ρ``; with ``t = √(2T)`` the verdict
    "below" holds while ``s + ρ < t`` or ``d + ρ < T``, i.e. while ``ρ < k = max(t - s, T - d)``;
    "above" holds while ``s - ρ > t`` or ``d - ρ > T``, ``k = max(s - t, d - T)``. The radius is
    ``ρ⁻¹(k)``: ``k`` itself without ``ref_norm``, more with ‖f(x)‖ (``embedding="append"``). Plain
    mode is not supported here; callers turn ``k`` into a radius themselves.
    """
    if _mode(embedding, ref_norm) != "append":
        raise ValueError("threshold radii are implemented for append-mode (1-Lipschitz g) models only")
    if not 0.0 < threshold < 2.0:  # NaN too
        raise ValueError(f"the threshold must lie in (0, 2), got {threshold}")
    d64 = np.clip(_f64(d), 0.0, 2.0)
    # rounding in d is absorbed by taking the unfavourable end of [d - slack, d + slack]
    d_lo = np.maximum(d64 - FLOAT_SLACK, 0.0)
    d_hi = d64 + FLOAT_SLACK
    t = math.sqrt(2 * threshold)
    below = np.maximum(t - np.sqrt(2 * d_hi), threshold - d_hi)
    above = np.maximum(np.sqrt(2 * d_lo) - t, d_lo - threshold)
    k = np.maximum(np.where(d64 < threshold, below, above), 0.0)
    radius = _inverse_movement(k, None if ref_norm is None else _f64(ref_norm), "append")
    return _out(_down32(radius), _template(d, ref_norm), "float32")


# -- from backbone features to answers (shared by the torch model and the NumPy engine) -------


def normalise_features(f, embedding: str):
    """Unit-norm embeddings g (float64) from backbone features f (B, k): :func:`lipsim.embedding.normalise`
    on float64, after a finiteness check."""
    f64 = _f64(f)
    _finite_features(f64)
    return _out(normalise(f64, embedding), _template(f), "float64")


def interval_from_features(fx, fy, eps: float, embedding: str):
    """``(d, lo, hi)`` (float32, shape (B,)) from the backbone features of x and y: the distance
    and bounds ``lo ≤ d(x + δ, y) ≤ hi`` for every ‖δ‖₂ ≤ eps (δ on x only)."""
    eps = check_eps(eps)
    fx64, fy64 = _f64(fx), _f64(fy)
    _finite_features(fx64, fy64)
    gx, gy = normalise(fx64, embedding), normalise(fy64, embedding)
    d = 1.0 - np.sum(gx * gy, axis=1)
    s = np.linalg.norm(gx - gy, axis=1)
    r = np.linalg.norm(fx64, axis=1)
    lo, hi = _distance_interval(d, eps, r, s, embedding)
    # The bounds above use d = ½s², true for unit g(x), g(y). In plain mode a zero feature
    # vector normalises to g = 0 (d = 1 whatever the other image); there, only
    # |d' - d| = |<g(x+δ) - g(x), g(y)>| ≤ ρ·‖g(y)‖ holds (an exact [1, 1] when g(y) = 0).
    ny = np.linalg.norm(gy, axis=1)
    degenerate = (np.linalg.norm(gx, axis=1) < 0.5) | (ny < 0.5)
    if degenerate.any():
        reach = _movement_bound(eps, r, embedding) * ny + FLOAT_SLACK
        lo = np.where(degenerate, np.clip(d - reach, 0.0, 2.0), lo)
        hi = np.where(degenerate, np.clip(d + reach, 0.0, 2.0), hi)
    like = _template(fx, fy)
    d = np.clip(d, 0.0, 2.0)  # rounding can leave [0, 2] by an ulp
    return _out(d, like, "float32"), _out(_down32(lo), like, "float32"), _out(_up32(hi), like, "float32")


def certificate_from_features(f_ref, f0, f1, embedding: str) -> Certificate2AFC:
    """Which of x0, x1 is closer to the reference, and the certified radius around the reference,
    from the backbone features of the three batches."""
    f_ref64, f0_64, f1_64 = _f64(f_ref), _f64(f0), _f64(f1)
    _finite_features(f_ref64, f0_64, f1_64)
    g_ref, g0, g1 = (normalise(f, embedding) for f in (f_ref64, f0_64, f1_64))
    d0 = 1.0 - np.sum(g_ref * g0, axis=1)
    d1 = 1.0 - np.sum(g_ref * g1, axis=1)
    gap = d1 - d0
    closer = np.where(gap > TIE_TOL, 0, np.where(gap < -TIE_TOL, 1, -1))
    radius = _radius_2afc(d0, d1, g0, g1, np.linalg.norm(f_ref64, axis=1), embedding)
    radius = np.where(closer < 0, 0.0, radius)
    like = _template(f_ref, f0, f1)
    return Certificate2AFC(
        closer=_out(closer, like, "int64"),
        d0=_out(np.clip(d0, 0.0, 2.0), like, "float32"),
        d1=_out(np.clip(d1, 0.0, 2.0), like, "float32"),
        radius=_out(_down32(radius), like, "float32"),
    )


# -- all pairs (shared by model.pairwise, the NumPy engine and `lipsim matrix`) -----------------


def _pairwise(gx: np.ndarray, gy: np.ndarray, eps, r: np.ndarray | None, embedding: str):
    """(N, M) float64 ``d`` and, with ``eps``, the interval of every ``d(x_i + δ, y_j)``.

    ``‖g_i - g_j‖² = ‖g_i‖² + ‖g_j‖² - 2⟨g_i, g_j⟩`` in float64: its rounding (≈ 1e-15 on a
    quantity at most 4) moves ``s`` by at most ≈ 4e-8 near 0, well inside :data:`EMBED_SLACK`.
    Zero feature vectors (plain mode) get the bound of :func:`interval_from_features`.
    """
    dot = gx @ gy.T
    d = 1.0 - dot
    if eps is None:
        return d, None, None
    nx2, ny2 = np.sum(gx * gx, axis=1), np.sum(gy * gy, axis=1)
    s = np.sqrt(np.maximum(nx2[:, None] + ny2[None, :] - 2.0 * dot, 0.0))
    r_col = None if r is None else r[:, None]
    lo, hi = _distance_interval(d, eps, r_col, s, embedding)
    nx, ny = np.sqrt(nx2), np.sqrt(ny2)
    degenerate = (nx < 0.5)[:, None] | (ny < 0.5)[None, :]
    if degenerate.any():
        reach = _movement_bound(eps, r_col, embedding) * ny[None, :] + FLOAT_SLACK
        lo = np.where(degenerate, np.clip(d - reach, 0.0, 2.0), lo)
        hi = np.where(degenerate, np.clip(d + reach, 0.0, 2.0), hi)
    return d, lo, hi


def _pairwise_out(d, lo, hi, like):
    d = _out(np.clip(d, 0.0, 2.0), like, "float32")
    if lo is None:
        return d
    return d, _out(_down32(lo), like, "float32"), _out(_up32(hi), like, "float32")


def pairwise_from_features(fx, fy, embedding: str, eps=None):
    """All distances ``D[i, j] = d(x_i, y_j)`` (float32, (N, M)) from backbone features (N, k) and
    (M, k); with ``eps``, also ``(lo, hi)``: bounds on ``d(x_i + δ, y_j)`` for every ‖δ‖₂ ≤ eps (δ on
    the row image x_i only), exactly the interval of :func:`interval_from_features` for each pair."""
    eps = None if eps is None else check_eps(eps)
    fx64, fy64 = _f64(fx), _f64(fy)
    _finite_features(fx64, fy64)
    gx, gy = normalise(fx64, embedding), normalise(fy64, embedding)
    r = np.linalg.norm(fx64, axis=1)
    return _pairwise_out(*_pairwise(gx, gy, eps, r, embedding), _template(fx, fy))


def pairwise_from_embeddings(gx, gy, eps=None, ref_norm=None, embedding: str | None = None):
    """:func:`pairwise_from_features` for cached unit embeddings g (``model.embed``), float32 or
    float64. Intervals (``eps``) need ``ref_norm`` (‖f(x_i)‖, (N,)) for plain-mode models; append
    mode (1-Lipschitz g) needs nothing more, and with ``embedding="append"`` and no ref_norm the
    norms are recovered from the embeddings (:func:`append_norm_from_embedding`)."""
    eps = None if eps is None else check_eps(eps)
    gx64, gy64 = _f64(gx), _f64(gy)
    _finite_features(gx64, gy64)
    mode = _mode(embedding, ref_norm)
    if ref_norm is not None:
        r = _f64(ref_norm)
    else:
        r = _append_norm(gx64) if embedding == "append" else None
    return _pairwise_out(*_pairwise(gx64, gy64, eps, r, mode), _template(gx, gy))


def pairwise_from_cached(gx, gy, dim: int, embedding: str, eps=None):
    """``model.pairwise`` on cached embeddings (N, dim) and (M, dim) (``gy=None``: gx itself): checks
    that they are a model's unit embeddings, then :func:`pairwise_from_embeddings`. Intervals of
    plain-mode models need ‖f(x)‖, which a unit embedding has lost: pass images there."""
    named = [(gx, "x")] if gy is None else [(gx, "x"), (gy, "y")]
    for g, name in named:
        shape = tuple(g.shape)
        if len(shape) != 2 or shape[0] == 0 or shape[1] != dim:
            raise ValueError(f"{name}: expected embeddings (N, {dim}) of this model, got shape {shape}")
        norms = np.linalg.norm(_f64(g), axis=1)
        if not np.all(np.abs(norms - 1.0) < 1e-3):  # False for NaN
            raise ValueError(f"{name}: embeddings must have unit norm (use model.embed)")
    if eps is not None and embedding != "append":
        raise ValueError("intervals from cached embeddings need an append-mode model; pass images instead")
    mode = "append" if embedding == "append" else None  # plain models reach here without eps
    return pairwise_from_embeddings(gx, gx if gy is None else gy, eps, embedding=mode)
