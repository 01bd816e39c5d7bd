"""The vulnerability demo: how far can a small perturbation move an image in a metric's eyes?

For each image x, ℓ2-PGD maximises ``d(x, x + δ)`` over ``‖δ‖₂ ≤ ε`` (random start inside the
ball, since the gradient vanishes at δ = 0; steps along the normalised gradient; projection onto
the ball; clipping to [0, 1]; the best iterate per image is kept). docs/method.md §7.3.

For LipSim the answer is bounded (§1.10): ``d(x, x + δ) = ½‖g(x) - g(x + δ)‖² ≤ ½ρ(ε)²`` per image,
with the movement bound ρ of :func:`lipsim.certify.movement_bound` at ``r = ‖f(x)‖``: for the
"append" embedding ``ρ(ε) = ε/√(max(r - ε, 0)² + 1) ≤ ε`` (so never more than ½ε²), for the
published "plain" one (g not 1-Lipschitz) ``ε/√(r(r - ε))``. Other metrics have no bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .. import certify
from .attacks import project_to_ball
from .metrics import LipSimMetric, Metric

__all__ = ["BOUND_SLACK", "DistanceAttackResult", "maximise_distance", "distance_bound", "attack_distances"]

#: float32 allowance when comparing a reached distance with its bound
BOUND_SLACK = 1e-5


@dataclass
class DistanceAttackResult:
    distances: torch.Tensor  # (N,) d(x, x + δ) reached, recomputed with metric.distance
    delta_l2: torch.Tensor  # (N,) ‖δ‖₂ of the returned perturbations (float64)
    bounds: torch.Tensor | None  # (N,) proven upper bound per image, None without one
    n_projected: int

    @property
    def bound_held(self) -> bool | None:
        if self.bounds is None:
            return None
        return bool((self.distances <= self.bounds + BOUND_SLACK).all())


def _objective(
    metric: Metric, x: torch.Tensor, anchor: torch.Tensor | None, adv: torch.Tensor
) -> torch.Tensor:
    if anchor is not None:
        return 1.0 - (metric.embed(adv) * anchor).sum(dim=1)
    return metric.distance(x, adv)


def maximise_distance(
    metric: Metric,
    x: torch.Tensor,
    eps: float,
    steps: int = 50,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """``(x + δ, n_projected)`` with ``‖δ‖₂ ≤ eps`` found by ℓ2-PGD to maximise ``d(x, x + δ)``."""
    if not eps > 0:
        raise ValueError("eps must be positive")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    x = x.detach().to(metric.device)
    n = x.shape[0]
    with torch.no_grad():
        anchor = metric.embed(x).detach() if metric.has_embedding else None
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    radius = torch.rand(n, generator=generator, dtype=x.dtype).to(x.device) * eps
    noise = noise / torch.linalg.vector_norm(noise.flatten(1), dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    adv = (x + noise * radius.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    adv, _ = project_to_ball(x, adv, eps, "l2")
    best = adv.clone()
    with torch.no_grad():
        best_val = _objective(metric, x, anchor, adv).detach()
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        value = _objective(metric, x, anchor, adv)
        (grad,) = torch.autograd.grad(value.sum(), adv)
        gnorm = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        with torch.no_grad():
            step = adv + alpha * grad / gnorm
            delta = step - x
            dnorm = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)
            delta = delta * torch.clamp(eps / dnorm, max=1.0).view(-1, 1, 1, 1)
            adv, _ = project_to_ball(x, (x + delta).clamp(0.0, 1.0), eps, "l2")
            value = _objective(metric, x, anchor, adv)
            better = value > best_val
            best[better] = adv[better]
            best_val = torch.where(better, value, best_val)
    best, fixed = project_to_ball(x, best, eps, "l2")
    return best.detach(), int(fixed.sum())


@torch.no_grad()
def distance_bound(metric: Metric, x: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Proven upper bound on ``d(x, x + δ)`` over ``‖δ‖₂ ≤ eps`` per image, or None.

    LipSim: ``½ρ(ε)²`` with the norm-aware movement bound of the model's embedding mode.
    """
    if not isinstance(metric, LipSimMetric):
        return None
    model = metric.model
    ref_norm = torch.linalg.vector_norm(model.features(x).double(), dim=1).cpu()
    rho = certify.movement_bound(eps, ref_norm, embedding=model.embedding)
    return 0.5 * rho.double() ** 2


def attack_distances(
    metric: Metric,
    images: Iterable[torch.Tensor],
    eps: float,
    steps: int = 50,
    step_size: float | None = None,
    seed: int = 0,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    total: int = 0,
) -> DistanceAttackResult:
    """Runs :func:`maximise_distance` over batches of images (each (B, 3, H, W) in [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    batches = progress(images, total) if progress else images
    dists, norms, bounds = [], [], []
    n_projected = 0
    for x in batches:
        x = x.to(metric.device)
        adv, fixed = maximise_distance(metric, x, eps, steps, step_size, generator)
        n_projected += fixed
        with torch.no_grad():
            dists.append(metric.distance(x, adv).double().cpu())
        norms.append(torch.linalg.vector_norm((adv - x).double().flatten(1), dim=1).cpu())
        b = distance_bound(metric, x, eps)
        if b is not None:
            bounds.append(b)
    if not dists:
        raise ValueError("no images to attack")
    return DistanceAttackResult(
        distances=torch.cat(dists),
        delta_l2=torch.cat(norms),
        bounds=torch.cat(bounds) if bounds else None,
        n_projected=n_projected,
    )
