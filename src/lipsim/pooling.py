"""Global 1-Lipschitz pooling over all positions of a map (layer kind ``global_pool``; the heads
of the pooled architectures in :mod:`lipsim.spec`). docs/method.md §2.4."""

from __future__ import annotations

import math

import torch

from .layers import LipschitzModule

__all__ = ["GlobalPool", "safe_sqrt"]


def safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """``sqrt(s)`` for ``s ≥ 0`` with the same values, and a finite gradient everywhere: at
    ``s = 0`` (a norm of an all-zero vector) the plain square root's derivative is infinite, and
    0·inf gives NaN in the backward pass. Here the gradient at 0 is 0 (a subgradient of the norm);
    the value, and so every bound below, is exactly the square root's."""
    positive = s > 0
    root = torch.sqrt(torch.where(positive, s, torch.ones_like(s)))
    return torch.where(positive, root, torch.zeros_like(s))


class GlobalPool(LipschitzModule):
    """Pools a (B, C, H, W) map over all n = H·W positions into a (B, C) or (B, 2C) feature.

    Modes (each coordinate block is per channel, in channel order; ``x_c`` is channel c's n values,
    ``m_c`` their mean):

    * ``sum``:      ``Σ_p x_c,p / √n``. Bound 1: by Cauchy-Schwarz ``|Σ_p d_p| ≤ √n·‖d‖₂`` for the
      difference d of two inputs; channels are disjoint, so the squares add up to ≤ ‖d‖².
    * ``norm``:     ``‖x_c‖₂``. Bound 1: the reverse triangle inequality
      ``|‖a_c‖ - ‖b_c‖| ≤ ‖a_c - b_c‖`` per channel, squared and summed over disjoint channels.
    * ``sum_norm``: ``[sum ; norm] / √2`` (issue 16's probe). Bound 1: each half is 1-Lipschitz, so
      the squared change is at most ``(‖d‖² + ‖d‖²)/2``.
    * ``sum_std``:  ``[sum ; ‖x_c - m_c‖₂]`` with no factor. Bound 1: per channel, ``x_c = u_c + v_c``
      with ``u_c = m_c·𝟙`` and ``v_c ⟂ 𝟙`` an orthogonal split, ``Σ_p x_c,p/√n = ⟨x_c, 𝟙/√n⟩``
      reads u_c isometrically (``‖u_c‖ = |Σ_p x_c,p|/√n``), and ``‖v_c‖`` is 1-Lipschitz in v_c;
      so the squared change is ``‖Δu_c‖² + (‖v_a‖ - ‖v_b‖)² ≤ ‖Δu_c‖² + ‖Δv_c‖² = ‖d_c‖²``
      (Pythagoras). It keeps the same information as ``sum_norm`` (‖x_c‖² = ‖u_c‖² + ‖v_c‖²) at
      √2 the scale, so one ℓ2 step of the input can move the embedding no more but the features
      are √2 larger.

    * ``sum_std_grid``: ``[sum_std ; grid] / √2`` where ``grid`` is, per channel, the sums over
      the four quadrants of the map (rows and columns split in halves, floor/ceil), each divided by
      the square root of its size: a little layout. Bound 1: each quadrant sum is 1-Lipschitz in
      its own positions (Cauchy-Schwarz) and the quadrants are disjoint, so ``grid`` is
      1-Lipschitz; two 1-Lipschitz halves concatenated change by at most √2·‖d‖, hence the √2.

    All modes but ``sum_std_grid`` are invariant to permutations of positions (so to circular
    shifts of the map) and to horizontal flips. Norms use :func:`safe_sqrt`: exact values, finite
    gradients at 0.
    """

    bound_reason = "global pooling: sum/√n (Cauchy-Schwarz), per-channel ℓ2 norms (reverse triangle)"
    MODES = ("sum", "norm", "sum_norm", "sum_std", "sum_std_grid")

    def __init__(self, mode: str = "sum_std"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown global pooling mode {mode!r} (choose from {', '.join(self.MODES)})")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"global pooling needs a (B, C, H, W) input, got shape {tuple(x.shape)}")
        flat = x.flatten(2)  # (B, C, n)
        root_n = math.sqrt(flat.shape[-1])
        total = flat.sum(dim=-1)
        if self.mode == "sum":
            return total / root_n
        if self.mode in ("sum_std", "sum_std_grid"):
            centred = flat - (total / flat.shape[-1]).unsqueeze(-1)
            out = torch.cat([total / root_n, safe_sqrt(centred.square().sum(dim=-1))], dim=1)
            if self.mode == "sum_std":
                return out
            h2, w2 = x.shape[2] // 2, x.shape[3] // 2
            quads = [x[:, :, :h2, :w2], x[:, :, :h2, w2:], x[:, :, h2:, :w2], x[:, :, h2:, w2:]]
            grid = [q.sum(dim=(2, 3)) / math.sqrt(q.shape[2] * q.shape[3]) for q in quads]
            return torch.cat([out, *grid], dim=1) / math.sqrt(2.0)
        norm = safe_sqrt(flat.square().sum(dim=-1))
        if self.mode == "norm":
            return norm
        return torch.cat([total / root_n, norm], dim=1) / math.sqrt(2.0)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"
