"""Certificate mathematics as pure functions on embeddings (no modules, no I/O).

Setting (lipsim-method.md §1.7-1.11). ``f`` is the 1-Lipschitz backbone, ``g = z/‖z‖`` the
normalised embedding with ``z = [f; 1]`` ("append" mode, ours) or ``z = f`` ("plain" mode, the
published checkpoints). ``d(x, y) = 1 - ⟨g(x), g(y)⟩ = ½‖g(x) - g(y)‖²``.

Movement bound. Let ``ρ(ε)`` bound ``‖g(x+δ) - g(x)‖`` over ``‖δ‖₂ ≤ ε``:

* append mode: ``‖z‖ ≥ 1`` everywhere and on ``{‖z‖ ≥ 1}`` the radial map equals the projection
  onto the unit ball, which is non-expansive; z is 1-Lipschitz, so ``ρ(ε) = ε``.
* plain mode with ``r = ‖f(x)‖``: for non-zero a, b, ``‖â - b̂‖ ≤ ‖a - b‖/√(‖a‖‖b‖)`` and
  ``‖f(x+δ)‖ ≥ r - ε``, so ``ρ(ε) = ε/√(r(r - ε))`` for ε < r; if ``r - ε ≥ 1`` the projection
  argument gives ``ρ(ε) = ε`` as well; always ``ρ ≤ 2``.

All results are computed in float64 from float32-or-wider embeddings, and every certified
quantity is shrunk by :data:`FLOAT_SLACK`, an absolute allowance for the rounding error of the
float32 forward pass, so a radius never rests on the last bits of a float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FLOAT_SLACK",
    "EMBED_SLACK",
    "TIE_TOL",
    "Certificate2AFC",
    "movement_bound",
    "radius_2afc",
    "radius_2afc_plain",
    "distance_interval",
    "radius_threshold",
]

#: absolute slack (in distance units) subtracted from every certified margin
FLOAT_SLACK = 1e-5
#: absolute slack on ‖g(x) - g(y)‖ computed from float32 embeddings
EMBED_SLACK = 1e-5
#: distances closer than this are a tie (float32 noise, not a decision)
TIE_TOL = 1e-7


@dataclass
class Certificate2AFC:
    """Result of :meth:`lipsim.LipSim.certify_2afc` (all tensors of shape (B,)).

    ``closer``: 0 if x0 is closer to the reference, 1 if x1, -1 on a tie.
    ``radius``: no ℓ2 perturbation of the reference with norm < radius changes ``closer``
    ([0, 1] pixel units of the model's input); 0 for ties.
    """

    closer: torch.Tensor
    d0: torch.Tensor
    d1: torch.Tensor
    radius: torch.Tensor

    def certified(self, eps: float) -> torch.Tensor:
        """Boolean mask of decisions that provably hold under every perturbation of norm ≤ eps."""
        return self.radius > eps


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _norm_upper(g0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    """‖g0 - g1‖ rounded up (relative 1e-6) so that dividing by it never overstates a radius."""
    return torch.linalg.vector_norm(_f64(g0) - _f64(g1), dim=-1) * (1 + 1e-6)


def movement_bound(eps: float | torch.Tensor, ref_norm: torch.Tensor | None) -> torch.Tensor:
    """Upper bound ρ on ‖g(x+δ) - g(x)‖ for ‖δ‖ ≤ eps (see the module docstring).

    ``ref_norm`` is ‖f(x)‖ in plain mode, ``None`` in append mode.
    """
    if ref_norm is None:
        eps_t = torch.as_tensor(eps, dtype=torch.float64)
        return eps_t.clamp(max=2.0)
    r = (_f64(ref_norm) - FLOAT_SLACK).clamp_min(0.0)
    eps_t = torch.as_tensor(eps, dtype=torch.float64).expand_as(r)
    inside = eps_t < r
    gap = torch.where(inside, r - eps_t, torch.ones_like(r))
    rho = torch.where(inside, eps_t / torch.sqrt(r * gap), torch.full_like(r, 2.0))
    rho = torch.where(r - eps_t >= 1.0, torch.minimum(rho, eps_t), rho)
    return rho.clamp(max=2.0)


def radius_2afc(d0: torch.Tensor, d1: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    """Certified radius when g is 1-Lipschitz (append mode).

    ``Δ(x) = d(x, x1) - d(x, x0) = ⟨g(x), g(x0) - g(x1)⟩`` moves by at most ``‖g(x+δ) - g(x)‖·B``
    with ``B = ‖g(x0) - g(x1)‖``, hence by at most ``‖δ‖·B``: the decision cannot flip for
    ``‖δ‖ < |d0 - d1|/B``. Ties (and anything within the float slack) get radius 0.
    """
    margin = (_f64(d0) - _f64(d1)).abs() - FLOAT_SLACK
    b = _norm_upper(g0, g1)
    radius = torch.where((margin > 0) & (b > 0), margin / b.clamp_min(1e-300), torch.zeros_like(margin))
    return radius.to(torch.float32)


def radius_2afc_plain(
    d0: torch.Tensor, d1: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, ref_norm: torch.Tensor
) -> torch.Tensor:
    """Sound radius for plain normalisation (published checkpoints), lipsim-method.md §1.11-1.

    With ``m = |d0 - d1|``, ``B = ‖g0 - g1‖``, ``r = ‖f(x_ref)‖``: the decision holds while
    ``B·ρ(ε) < m``. (i) ``ρ(ε) = ε/√(r(r-ε))`` gives ``ε* = r·m·(√(m² + 4B²) - m)/(2B²)``, the
    root of ``B·ε/√(r(r-ε)) = m``; (ii) for ``ε ≤ r - 1`` the projection argument gives
    ``ρ = ε`` and ``m/B``. Radius = ``max(ε*, min(m/B, r - 1))``; never the optimistic ``m/B``.
    """
    m = (_f64(d0) - _f64(d1)).abs() - FLOAT_SLACK
    b = _norm_upper(g0, g1)
    r = _f64(ref_norm) - FLOAT_SLACK
    ok = (m > 0) & (b > 0) & (r > 0)
    m_ = m.clamp_min(0)
    b_ = b.clamp_min(1e-300)
    eps_star = r * m_ * (torch.sqrt(m_**2 + 4 * b_**2) - m_) / (2 * b_**2)
    proj = torch.minimum(m_ / b_, (r - 1).clamp_min(0))
    radius = torch.minimum(torch.maximum(eps_star, proj), m_ / b_)
    radius = torch.where(ok, radius, torch.zeros_like(m))
    return radius.to(torch.float32)


def distance_interval(
    d: torch.Tensor, eps: float, ref_norm: torch.Tensor | None = None, s: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval holding every d(x + δ, y) with ‖δ‖ ≤ eps, given d = d(x, y).

    With ``s = ‖g(x) - g(y)‖ = √(2d)`` and the movement bound ρ, the triangle inequality gives
    ``‖g(x+δ) - g(y)‖ ∈ [s - ρ, s + ρ]``, so ``d' ∈ [½(s-ρ)₊², ½(s+ρ)²]``; also
    ``|d' - d| = |⟨g(x+δ) - g(x), g(y)⟩| ≤ ρ`` and ``0 ≤ d' ≤ 2``. The intersection is returned.
    For small d this is much tighter than ``d ± ε`` (at d = 0 it is ``[0, ½ε²]``).

    Rounding: pass ``s`` computed from the embeddings when available; it is widened by
    :data:`EMBED_SLACK`. Without it, s is derived from d widened by :data:`FLOAT_SLACK`
    (conservative: √ amplifies the error of d near 0).
    """
    d64 = _f64(d).clamp(0.0, 2.0)
    rho = movement_bound(eps, ref_norm).to(d64.device)
    if s is None:
        s_lo = torch.sqrt(2 * (d64 - FLOAT_SLACK).clamp_min(0.0))
        s_hi = torch.sqrt(2 * (d64 + FLOAT_SLACK).clamp(max=2.0))
    else:
        s64 = _f64(s)
        s_lo, s_hi = (s64 - EMBED_SLACK).clamp_min(0.0), (s64 + EMBED_SLACK).clamp(max=2.0)
    d_lo, d_hi = 0.5 * s_lo**2, 0.5 * s_hi**2
    lo = torch.maximum(0.5 * (s_lo - rho).clamp_min(0) ** 2, d_lo - rho).clamp_min(0.0)
    hi = torch.minimum(0.5 * (s_hi + rho) ** 2, d_hi + rho).clamp(max=2.0)
    return lo.to(torch.float32), hi.to(torch.float32)


def radius_threshold(d: torch.Tensor, threshold: float, ref_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Largest ε such that ``d(x+δ, y) < T`` (or ``> T``) keeps its side for all ‖δ‖ < ε.

    Append mode: ``d' ∈ [½(s-ε)², ½(s+ε)²]`` and ``|d' - d| ≤ ε``; with ``t = √(2T)`` the verdict
    "below" holds while ``s + ε < t`` or ``d + ε < T``, so ``ε = max(t - s, T - d)``; "above"
    holds while ``s - ε > t`` or ``d - ε > T``, so ``ε = max(s - t, d - T)``. Plain mode is not
    supported here (its movement bound is not linear in ε); callers use append-mode models.
    """
    if ref_norm is not None:
        raise ValueError("threshold radii are implemented for append-mode (1-Lipschitz g) models only")
    d64 = _f64(d).clamp(0.0, 2.0)
    # rounding in d is absorbed by taking the unfavourable end of [d - slack, d + slack]
    d_lo = (d64 - FLOAT_SLACK).clamp_min(0.0)
    d_hi = d64 + FLOAT_SLACK
    t = math.sqrt(2 * threshold)
    below = torch.maximum(t - torch.sqrt(2 * d_hi), threshold - d_hi)
    above = torch.maximum(torch.sqrt(2 * d_lo) - t, d_lo - threshold)
    radius = torch.where(d64 < threshold, below, above)
    return radius.clamp_min(0.0).to(torch.float32)
