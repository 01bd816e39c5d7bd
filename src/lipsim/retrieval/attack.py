"""Empirical attacks on retrieval decisions (ℓ2-PGD on the query), to test the certificates.

An attack can only show that a decision *can* be changed; the certificates in
:mod:`lipsim.retrieval.certificate` prove that it cannot within their radius. Used by the
tests (no attack inside a radius may succeed) and by ``scripts/retrieval_demo.py``.
Perturbations are ℓ2 in the [0, 1] pixel space; the perturbed images are kept in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["pgd_l2", "top1_margin", "attack_top1", "attack_threshold"]


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1).view(-1, *([1] * (x.dim() - 1)))


def pgd_l2(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 50,
    step_size: float | None = None,
    restarts: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximises ``objective`` (images (B, ...) -> (B,)) over ``‖δ‖₂ ≤ eps`` with ``x + δ ∈ [0, 1]``.

    ``eps`` is a number or a (B,) tensor (one budget per sample).
    Normalised-gradient ascent with projection onto the ball, then clamping to the box (which
    moves each coordinate towards x, so the norm stays ≤ eps). The first run starts at δ = 0,
    later restarts at a random point of the ball. Returns the best images found and their
    objective values.
    """
    x = x.detach()
    shape = (-1, *([1] * (x.dim() - 1)))
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).reshape(shape)
    if not bool((eps_t >= 0).all()):  # NaN too
        raise ValueError("eps must be a non-negative number")
    alpha = step_size if step_size is not None else 2.5 * eps_t / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        best_x, best_v = x.clone(), objective(x).detach()
    for run in range(restarts):
        if run == 0:
            delta = torch.zeros_like(x)
        else:
            delta = torch.randn(x.shape, generator=gen).to(x)
            radius = eps_t * torch.rand((x.shape[0],), generator=gen).to(x).reshape(shape)
            delta = delta / _per_sample_norm(delta) * radius
            delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            value = objective(x + delta)
            (grad,) = torch.autograd.grad(value.sum(), delta)
            with torch.no_grad():
                better = value.detach() > best_v
                best_v = torch.where(better, value.detach(), best_v)
                best_x[better] = (x + delta)[better].detach()
                delta = delta + alpha * grad / _per_sample_norm(grad).clamp_min(1e-12)
                norm = _per_sample_norm(delta)
                delta = delta * torch.clamp(eps_t / norm.clamp_min(1e-12), max=1.0)
                delta = (x + delta).clamp(0, 1) - x
        with torch.no_grad():
            value = objective(x + delta)
            better = value > best_v
            best_v = torch.where(better, value, best_v)
            best_x[better] = (x + delta)[better]
    return best_x, best_v


def top1_margin(query_emb: torch.Tensor, gallery: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """``d(q, a) - min_{b≠a} d(q, b)`` per query (positive once a rival is strictly closer).

    ``query_emb`` (B, D), ``gallery`` (N, D) unit embeddings, ``top1`` (B,) the item ``a``.
    """
    sims = query_emb @ gallery.T
    own = sims.gather(1, top1.view(-1, 1)).squeeze(1)
    rivals = sims.scatter(1, top1.view(-1, 1), float("-inf"))
    return rivals.max(dim=1).values - own


def attack_top1(
    embed: Callable[[torch.Tensor], torch.Tensor],
    queries: torch.Tensor,
    gallery: torch.Tensor,
    top1: torch.Tensor,
    eps: float,
    **pgd_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ2-PGD on the queries maximising the margin of the best rival over ``top1``.

    ``embed`` maps images to unit embeddings (a LipSim's ``embed`` or a teacher's, normalised).
    Returns the perturbed queries and their margins (> 0: the top-1 changed).
    """
    gallery = gallery.detach().to(queries.device, torch.float32)
    top1 = top1.to(queries.device)
    return pgd_l2(lambda x: top1_margin(embed(x), gallery, top1), queries, eps, **pgd_kwargs)


def attack_threshold(
    embed: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    partner: torch.Tensor,
    threshold: float,
    below: torch.Tensor,
    eps: float,
    **pgd_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ2-PGD on ``x`` pushing ``d(x, partner)`` across ``threshold`` (up where ``below``, else down).

    ``partner`` (B, D) are the fixed embeddings of the other images. Returns the perturbed
    images and the signed value ``±(d - T)``: a "below" verdict (d < T) is broken at ≥ 0, an
    "above" verdict (d ≥ T) at > 0.
    """
    partner = partner.detach().to(x.device, torch.float32)
    sign = torch.where(below.to(x.device), 1.0, -1.0)

    def crossing(z: torch.Tensor) -> torch.Tensor:
        d = 1.0 - (embed(z) * partner).sum(dim=1)
        return sign * (d - threshold)

    return pgd_l2(crossing, x, eps, **pgd_kwargs)
