"""Lipschitz verification: the declared chain, layer by layer, and power-iteration estimates.

A certificate rests on every layer of the backbone being 1-Lipschitz and on the embedding
normalisation not expanding distances. :func:`verify_model` checks the first symbolically (each
leaf must be a :class:`lipsim.layers.LipschitzModule` with bound ≤ 1; SLL layers also have their
``T ⪰ WWᵀ`` condition checked numerically) and estimates local Lipschitz constants (spectral norm
of the Jacobian) of each parametric layer and of the whole embedding by power iteration.
Estimates are lower bounds of the true constant: a value above 1 disproves a claim, a value at
or below 1 is evidence, the proof being the layer algebra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import LipschitzModule, SLLConv2d, SLLLinear, safe_inverse, sll_linear_rescaling
from .model import LipSim, exact_float32
from .pooling import GlobalPool
from .quiet import torch_notices_off

__all__ = ["jacobian_spectral_norm", "LayerReport", "VerifyReport", "verify_model"]


def jacobian_spectral_norm(fn, x: torch.Tensor, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Per-sample power iteration on JᵀJ of ``fn`` at ``x`` (fn maps (B, ...) -> (B, ...)
    sample-wise). Returns (B,) estimates of ‖J‖₂, each a lower bound that converges upwards."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.detach()
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    dims = tuple(range(1, x.dim()))
    v = v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    _, vjp_fn = torch.func.vjp(fn, x)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        with torch_notices_off():  # torch's own jit-deprecation notice on first forward-AD use
            _, jv = torch.func.jvp(fn, (x,), (v,))
        out_dims = tuple(range(1, jv.dim()))
        sigma = torch.linalg.vector_norm(jv, dim=out_dims)
        (w,) = vjp_fn(jv)
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        v = torch.where(wn > 0, w / wn.clamp_min(1e-30), v)
    return sigma.detach()


@dataclass
class LayerReport:
    name: str
    kind: str
    bound: float | None
    reason: str
    estimate: float | None = None
    algebra_ok: bool | None = None

    @property
    def ok(self) -> bool:
        if self.bound is None or self.bound > 1.0:
            return False
        if self.algebra_ok is False:
            return False
        return self.estimate is None or self.estimate <= 1.0 + 1e-4


@dataclass
class VerifyReport:
    arch: str
    embedding: str
    layers: list[LayerReport] = field(default_factory=list)
    embedding_estimates: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_embedding_estimate(self) -> float:
        return max(self.embedding_estimates, default=0.0)

    @property
    def passed(self) -> bool:
        chain_ok = all(layer.ok for layer in self.layers)
        if self.embedding == "append":
            return chain_ok and self.max_embedding_estimate <= 1.0 + 1e-4
        return chain_ok

    def as_dict(self) -> dict:
        return {
            "arch": self.arch,
            "embedding": self.embedding,
            "passed": self.passed,
            "max_layer_estimate": max((l.estimate or 0.0 for l in self.layers), default=0.0),
            "max_embedding_estimate": self.max_embedding_estimate,
            "layers": [
                {"name": l.name, "kind": l.kind, "bound": l.bound, "estimate": l.estimate, "ok": l.ok}
                for l in self.layers
            ],
            "notes": self.notes,
        }


def _sll_linear_algebra_ok(layer: SLLLinear) -> bool:
    """Checks ``diag(t) - WWᵀ ⪰ 0`` numerically (float64 eigenvalues, scale-aware tolerance)."""
    with torch.no_grad():
        w = layer.weight.double()
        t = sll_linear_rescaling(w, layer.q.double())
        inv = safe_inverse(t)
        live = inv > 0
        if live.sum() == 0:
            return True
        w, t = w[live], t[live]
        gram = w @ w.T
        eig = torch.linalg.eigvalsh(torch.diag(t) - gram)
        return bool(eig.min() >= -1e-9 * max(float(t.max()), 1.0))


def verify_model(
    model: LipSim, images: torch.Tensor | None = None, n_random: int = 2, iters: int = 20, seed: int = 0
) -> VerifyReport:
    """Checks the Lipschitz chain of ``model`` and estimates local constants on ``images``
    (or on ``n_random`` random images in [0, 1])."""
    backbone = model.backbone
    report = VerifyReport(arch=model.arch, embedding=model.embedding)
    device = model.device
    size = model.input_size
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand((n_random, 3, size, size), generator=gen)
    images = images.to(device=device, dtype=torch.float32)

    captured: dict[str, torch.Tensor] = {}
    hooks = []
    leaves = backbone.lipschitz_layers()
    for name, module in leaves:
        if isinstance(module, (SLLConv2d, SLLLinear, GlobalPool)):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda mod, args, name=name: captured.__setitem__(name, args[0].detach()[:1].clone())
                )
            )
    try:
        with torch.no_grad(), exact_float32():
            backbone(images[:1])
    finally:
        for h in hooks:
            h.remove()

    for name, module in leaves:
        if isinstance(module, LipschitzModule):
            entry = LayerReport(
                name, type(module).__name__, float(module.lipschitz_bound), module.bound_reason
            )
        else:
            entry = LayerReport(name, type(module).__name__, None, "no proven bound: not certifiable")
        if isinstance(module, SLLLinear):
            entry.algebra_ok = _sll_linear_algebra_ok(module)
        if name in captured:
            with exact_float32():
                entry.estimate = float(
                    jacobian_spectral_norm(module, captured[name], iters=iters, seed=seed)[0]
                )
        report.layers.append(entry)

    if model.embedding == "plain":
        report.notes.append(
            "plain normalisation: g = f/|f| is not 1-Lipschitz where |f| < 1; certificates use the "
            "norm-aware radius (never the optimistic published one)"
        )
    with exact_float32():
        est = jacobian_spectral_norm(model.embed, images, iters=iters, seed=seed)
    report.embedding_estimates = [float(v) for v in est]
    if any(isinstance(m, nn.Module) and not isinstance(m, LipschitzModule) for _, m in leaves):
        report.notes.append("the backbone contains layers without a proven bound")
    return report
