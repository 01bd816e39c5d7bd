"""1-Lipschitz building blocks (ℓ2 norm, on any input shape they accept).

Every module here carries a ``lipschitz_bound`` (a proven upper bound on its ℓ2 Lipschitz
constant, here always 1.0) and its docstring says why the bound holds. ``lipsim verify`` walks a
backbone and refuses any module that does not declare a bound, so a new layer must come here,
with its proof, before a model that uses it can be called certified.

The SLL layers follow Araujo et al., "A Unified Algebraic Perspective on Lipschitz Neural
Networks" (ICLR 2023), in the parametrisation that the published LipSim checkpoints use
(``kernel``/``weight``, ``bias`` and ``q`` tensors; docs/method.md §2.1-2.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import at_least_float32, ieee_float32

__all__ = [
    "LipschitzModule",
    "SLLConv2d",
    "SLLLinear",
    "ZeroChannelPad",
    "SumPool",
    "Shift",
    "SpaceToDepth",
    "Flatten",
    "Truncate",
    "ZeroPadFeatures",
    "safe_inverse",
    "sll_conv_rescaling",
    "sll_linear_rescaling",
    "fold_sll_conv",
    "sll_conv",
    "adjoint_kernel",
    "sll_linear",
    "use_fused_training",
]


def safe_inverse(t: torch.Tensor) -> torch.Tensor:
    """Elementwise 1/t with 1/0 := 0 (a zero row of the Gram matrix means a dead channel)."""
    return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


def sll_conv_rescaling(kernel: torch.Tensor) -> torch.Tensor:
    """Per-inner-channel rescaling ``t_i = Σ_{j,shift} |G_ij(shift)|`` of an SLL convolution.

    ``G = K ⋆ K`` (padding 2) is the stencil of 𝒦𝒦* for "convolve with K" on an infinite grid.
    Diagonal dominance gives ``diag(t) ⪰ 𝒦𝒦*`` there, and on the zero-padded finite grid 𝒦𝒦* is
    dominated by that restriction, so ``diag(t) ⪰ 𝒦𝒦*`` holds on every input size.
    The published code multiplies by exp(q) and exp(-q) along the same axis, so q cancels: we
    reproduce that (q is stored, never used), which keeps published checkpoints bit-compatible.
    """
    gram = F.conv2d(kernel, kernel, padding=kernel.shape[-1] - 1)
    return gram.abs().sum(dim=(1, 2, 3))


def sll_linear_rescaling(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``t_i = Σ_j |(W Wᵀ)_ij| · exp(q_j - q_i)``: with ``D = diag(exp q)``, ``D(T - WWᵀ)D`` is
    symmetric and diagonally dominant with a non-negative diagonal, hence PSD, so
    ``diag(t) ⪰ WWᵀ`` for every q."""
    gram = weight @ weight.T
    scale = torch.exp(q)[None, :] * torch.exp(-q)[:, None]
    return (gram * scale).abs().sum(dim=1)


class LipschitzModule(nn.Module):
    """Base class: a module with a proven ℓ2 Lipschitz bound."""

    lipschitz_bound: float = 1.0
    #: one line on why the bound holds, printed by ``lipsim verify``
    bound_reason: str = ""


def _autodiff_free(*tensors: torch.Tensor) -> bool:
    """True when no autodiff mode (autograd, forward AD, torch.func) records ops on ``tensors``,
    so that intermediate buffers may be overwritten in place."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def fold_sll_conv(kernel: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> tuple:
    """The fold of an SLL convolution (written once; the training node, the layer and the frozen
    engine use it): ``(s·K, s·b, -flip(K)ᵀ)`` from the kernel (inner, C, k, k), the bias and the
    rescaling ``s = 2/t ≥ 0``. Then ``x - 𝒦*(s·ReLU(𝒦x + b)) = x + conv(ReLU(conv(x, s·K) + s·b),
    -flip(K)ᵀ)``: ``s·ReLU(z) = ReLU(s·z)`` for ``s ≥ 0``, and the transposed convolution (stride 1,
    "same" padding) is the convolution with the spatially flipped, channel-transposed kernel.
    Differentiable in all three inputs."""
    return kernel * scale.view(-1, 1, 1, 1), bias.reshape(-1) * scale, adjoint_kernel(kernel)


def adjoint_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """``-flip(K)ᵀ``: convolving with it is ``-𝒦*`` (stride 1, "same" padding)."""
    return kernel.neg().transpose(0, 1).flip(-2, -1)


def _sll_inner(x: torch.Tensor, k1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``s·ReLU(𝒦x + b)`` from folded weights."""
    return F.conv2d(x, k1, b1, padding=k1.shape[-1] // 2).relu_()


def sll_conv(x: torch.Tensor, k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, into_x: bool = False,
             scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The SLL convolution ``x - 𝒦*(s·ReLU(𝒦x + b))`` from folded weights (:func:`fold_sll_conv`),
    or, with ``scale``, from ``(K, b, -flip(K)ᵀ)`` with s applied after the ReLU (the plain autograd
    graph: its gradient of s is more accurate in float32 than one taken through s·K).
    ``into_x``: accumulate into x's own buffer (the frozen engine, on buffers it owns)."""
    r = _sll_inner(x, k1, b1)
    if scale is not None:
        r = r * scale.view(1, -1, 1, 1)
    y = F.conv2d(r, k2, padding=k2.shape[-1] // 2)
    if into_x:
        return x.add_(y)
    return y.add_(x) if _autodiff_free(x, y) else x + y


def sll_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor):
    """The SLL linear layer ``x - Wᵀ(s·ReLU(Wx + b))`` on (B, n) features, bias and residual inside
    the two GEMMs (written once; the layer and the frozen engine use it)."""
    res = torch.addmm(bias.reshape(-1), x, weight.t()).relu_() * scale
    return torch.addmm(x, res, weight, alpha=-1)


class _SLLConvTrain(torch.autograd.Function):
    """``y = x - 𝒦*(s·ReLU(𝒦x + b))`` as one autograd node (the layer's fused training path), with
    ``s = 2/t`` an *input* (autograd carries its gradient on to the kernel through t).

    Forward: ``r = ReLU(conv(x, s·K) + s·b)``, ``y = x + conv(r, K')`` with ``K' = -flip(K)ᵀ``
    (:func:`fold_sll_conv`). Saved: x, r (the narrow inner activation), K, s; the plain graph keeps
    four activations per layer.
    Backward, with ``z = 𝒦x + b``: ``g_r = ∂L/∂r`` from the second convolution's backward;
    ``∂L/∂z = g_r·s·[r > 0]``; ``∂L/∂s_i = Σ g_r·ReLU(z) = Σ g_r·r/s_i`` (0 where s_i = 0, where
    s has no gradient anyway: ``s = 2·safe_inverse(t)`` is constant there); x, K, b from the
    first convolution's backward, and K's second share from ``K'``.
    First-order only (``once_differentiable``)."""

    @staticmethod
    def forward(ctx, x, kernel, bias, scale):
        k1, b1, k2 = fold_sll_conv(kernel, bias, scale)
        r = _sll_inner(x, k1, b1)
        y = torch.add(x, F.conv2d(r, k2, padding=k2.shape[-1] // 2))
        ctx.save_for_backward(x, kernel, scale, r)
        ctx.bias_shape = bias.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, kernel, scale, r = ctx.saved_tensors
        pad = kernel.shape[-1] // 2
        need_x, need_k, need_b, need_s = ctx.needs_input_grad[:4]
        k2 = adjoint_kernel(kernel)
        g_r, g_k2, _ = _conv_backward(gy, r, k2, pad, [True, need_k, False])
        s = scale.view(1, -1, 1, 1)
        gs = None
        if need_s:
            inv = torch.where(scale > 0, 1.0 / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)
            gs = (g_r * r).sum(dim=(0, 2, 3)) * inv
        gz = torch.where(r > 0, g_r * s, 0.0)
        g_x, g_k, g_b = _conv_backward(gz, x, kernel, pad, [need_x, need_k, need_b], bias=True)
        gx = gy + g_x if need_x else None
        gk = g_k - g_k2.transpose(0, 1).flip(-2, -1) if need_k else None
        gb = g_b.reshape(ctx.bias_shape) if need_b else None
        return gx, gk, gb, gs


def _conv_backward(grad_out, inp, weight, pad: int, mask: list[bool], bias: bool = False):
    """Gradients of ``conv2d(inp, weight (+ bias), padding=pad)`` (what autograd would call)."""
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]] if bias else None,
        [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask,
    )  # fmt: skip


def _fused_training_applies(x: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Plain reverse-mode autograd to the parameters in float32/float64 without autocast: the one
    setting the fused training node is written for (forward AD, torch.func and AMP keep the
    layer-by-layer graph)."""
    if not (torch.is_grad_enabled() and kernel.requires_grad):
        return False
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return False
    if getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    dev = x.device.type
    return not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev))


def use_fused_training(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Sets the fused-training flag of every SLL convolution in ``module`` (in place; returns it).
    On (the default), a training forward runs each SLL convolution as one autograd node with a
    hand-written backward (same function, less memory); off, as plain autograd ops."""
    for m in module.modules():
        if isinstance(m, SLLConv2d):
            m.fused_training = enabled
    return module


class _SLLBase(LipschitzModule):
    """Shared by the SLL layers: the inverse rescaling ``s = 2/t``, computed on every call (no
    cache: a frozen engine, :func:`lipsim.engine.fold`, computes it once) from weights of at least
    float32 with autocast off; in IEEE float32 (no TF32, whatever the caller set) unless gradients
    flow to the parameters, where it is differentiable (:mod:`lipsim.precision`)."""

    def scale(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.bias.requires_grad:  # training: float32, autocast off
            with torch.autocast(self.bias.device.type, enabled=False):
                return 2.0 * safe_inverse(self._rescaling())
        with ieee_float32(self.bias.device.type):
            return 2.0 * safe_inverse(self._rescaling())

    def _rescaling(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SLLConv2d(_SLLBase):
    """SLL residual convolution ``h(x) = x - 2·𝒦*(T⁻¹ ReLU(𝒦x + b))``, 3×3 kernels, padding 1.

    Bound: 1. The Jacobian is ``I - 2𝒦*T⁻¹D𝒦`` with D a 0/1 diagonal (ReLU); since
    ``T ⪰ 𝒦𝒦*`` (see :func:`sll_conv_rescaling`) its spectral norm is at most 1 (SLL theorem).
    ``inner`` is the bottleneck width (the published ``conv_size``, default 5).
    """

    bound_reason = "SLL residual conv: T ⪰ KK* by diagonal dominance of the kernel Gram stencil"
    #: training forward as one autograd node (:func:`use_fused_training`); not saved with the weights
    fused_training = True

    def __init__(self, channels: int, inner: int = 5, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("SLLConv2d needs an odd kernel size")
        self.channels, self.inner = channels, inner
        self.kernel = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(1, inner, 1, 1))
        self.q = nn.Parameter(torch.empty(inner))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.kernel)
        fan_in = self.channels * self.kernel.shape[-1] ** 2
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.normal_(self.q)

    def _rescaling(self) -> torch.Tensor:
        return sll_conv_rescaling(at_least_float32(self.kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale().to(x.dtype)
        if self.fused_training and _fused_training_applies(x, self.kernel):
            return _SLLConvTrain.apply(x, self.kernel, self.bias, scale)
        kernel = self.kernel.to(x.dtype)
        return sll_conv(x, kernel, self.bias.to(x.dtype).reshape(-1), adjoint_kernel(kernel), scale=scale)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}"


class SLLLinear(_SLLBase):
    """SLL residual linear layer ``h(x) = x - 2·Wᵀ T⁻¹ ReLU(W x + b)`` (dimension preserving).

    Bound: 1. Jacobian ``I - 2WᵀT⁻¹DW`` with ``T ⪰ WWᵀ`` (see :func:`sll_linear_rescaling`),
    so its spectral norm is at most 1. ``inner`` is the published ``n_features``.
    """

    bound_reason = "SLL residual linear: T ⪰ WWᵀ by q-weighted diagonal dominance"

    def __init__(self, features: int, inner: int):
        super().__init__()
        self.features, self.inner = features, inner
        self.weight = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(1, inner))
        self.q = nn.Parameter(torch.empty(inner))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        bound = 1 / math.sqrt(self.features)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.normal_(self.q)

    def _rescaling(self) -> torch.Tensor:
        return sll_linear_rescaling(at_least_float32(self.weight), at_least_float32(self.q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sll_linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.scale().to(x.dtype))

    def extra_repr(self) -> str:
        return f"features={self.features}, inner={self.inner}"


class ZeroChannelPad(LipschitzModule):
    """Writes the input channels into the first channels of a wider zero tensor. Isometry (bound 1)."""

    bound_reason = "isometry: copies the input and appends zero channels"

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.channels - x.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {x.shape[1]} channels down to {self.channels}")
        return F.pad(x, (0, 0, 0, 0, 0, extra))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class SumPool(LipschitzModule):
    """Non-overlapping k×k window sums divided by k (the published pooling has k = 4).

    Bound: 1, tight. By Cauchy-Schwarz ``|Σ_{k²} x_i| ≤ k·‖x_window‖₂``; windows are disjoint.
    """

    bound_reason = "window sum / k: |sum of k² entries| ≤ k·(their ℓ2 norm), disjoint windows"

    def __init__(self, k: int = 4):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.k, stride=self.k, divisor_override=self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class Shift(LipschitzModule):
    """Subtracts a constant: ``x - c``. Isometry (bound 1): differences are unchanged.

    Centring [0, 1] pixels at 0.5 removes the large constant component a backbone would
    otherwise have to learn to cancel; certificates are unaffected."""

    bound_reason = "isometry: a translation"

    def __init__(self, value: float):
        super().__init__()
        self.value = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.value

    def extra_repr(self) -> str:
        return f"value={self.value}"


class SpaceToDepth(LipschitzModule):
    """Rearranges r×r pixel blocks into channels (C, H, W) -> (C·r², H/r, W/r). Isometry (bound 1)."""

    bound_reason = "isometry: a permutation of coordinates (pixel unshuffle)"

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.r)

    def extra_repr(self) -> str:
        return f"r={self.r}"


class Flatten(LipschitzModule):
    """Channel-major flatten (index c·H·W + h·W + w). Isometry (bound 1)."""

    bound_reason = "isometry: a reshape"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class Truncate(LipschitzModule):
    """Keeps the first ``n`` coordinates: a coordinate projection (bound 1)."""

    bound_reason = "coordinate projection"

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < self.n:
            raise ValueError(f"cannot keep {self.n} of {x.shape[1]} features")
        return x[:, : self.n]

    def extra_repr(self) -> str:
        return f"n={self.n}"


class ZeroPadFeatures(LipschitzModule):
    """Appends zero coordinates to a feature vector up to ``n``. Isometry (bound 1)."""

    bound_reason = "isometry: appends zero coordinates"

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.n:
            raise ValueError(f"cannot pad {x.shape[1]} features down to {self.n}")
        return F.pad(x, (0, self.n - x.shape[1]))

    def extra_repr(self) -> str:
        return f"n={self.n}"
