"""1-Lipschitz building blocks (ℓ2 norm, on any input shape they accept).

Every module here carries a ``lipschitz_bound`` (a proven upper bound on its ℓ2 Lipschitz
constant, here always 1.0) and its docstring says why the bound holds. ``lipsim verify`` walks a
backbone and refuses any module that does not declare a bound, so a new layer must come here,
with its proof, before a model that uses it can be called certified.

The SLL layers follow Araujo et al., "A Unified Algebraic Perspective on Lipschitz Neural
Networks" (ICLR 2023), in the parametrisation that the published LipSim checkpoints use
(``kernel``/``weight``, ``bias`` and ``q`` tensors; lipsim-method.md §1.2-1.3).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    "GlobalPool",
    "safe_sqrt",
    "safe_inverse",
    "sll_conv_rescaling",
    "sll_linear_rescaling",
]


def safe_inverse(t: torch.Tensor) -> torch.Tensor:
    """Elementwise 1/t with 1/0 := 0 (a zero row of the Gram matrix means a dead channel)."""
    return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is held in a narrower float type (fp16/bf16 parameters): a Gram
    matrix summed in 16 bits can fall below WWᵀ, and T must dominate it for the layer to be
    1-Lipschitz. The upcast is exact, so the layer still computes with the stored weights."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


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


#: Parameters that some cached rescaling depends on, by id (held weakly).
_CACHED_PARAMS: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
#: Bumped after every optimizer step that touches one of those parameters.
_optimizer_generation = 0


def _note_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook. Fused optimizers (``Adam(fused=True)`` and friends) write
    parameters in place *without* bumping their version counters, so versions alone would let a
    cache outlive such a step; a step over any cached parameter invalidates every cache."""
    global _optimizer_generation
    if len(_CACHED_PARAMS) == 0:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if _CACHED_PARAMS.get(id(p)) is p:
                _optimizer_generation += 1
                return


register_optimizer_step_post_hook(_note_optimizer_step)

# Backends of torch's fp32-precision settings, parents before children (setting a parent
# overwrites its children, so they are restored in this order).
_FP32_PRECISION_PATHS = (
    (),
    ("cuda", "matmul"),
    ("cudnn",),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn",),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


def _precision_objects() -> list:
    objs = []
    for path in _FP32_PRECISION_PATHS:
        obj = torch.backends
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            objs.append(obj)
    return objs


@contextlib.contextmanager
def _ieee_float32(device_type: str) -> Iterator[None]:
    """IEEE float32 arithmetic for the block whatever the caller set globally (TF32, bf16
    "medium" matmul precision, autocast); every setting is restored afterwards. Used to compute
    the cached rescaling, which certificates later rely on."""
    objs = _precision_objects()
    saved = [o.fp32_precision for o in objs]
    try:
        for o in objs:
            o.fp32_precision = "ieee"
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        for o, value in zip(objs, saved, strict=True):
            o.fp32_precision = value


def _autodiff_free(*tensors: torch.Tensor) -> bool:
    """True when no autodiff mode (autograd, forward AD, torch.func) records ops on ``tensors``,
    so that intermediate buffers may be overwritten in place."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


#: per (row length, dtype, device): the weights of :func:`_fingerprint`'s weighted row sums
_ROW_WEIGHTS: dict = {}


def _row_weights(n: int, like: torch.Tensor) -> torch.Tensor:
    key = (n, like.dtype, like.device)
    w = _ROW_WEIGHTS.get(key)
    if w is None:
        # distinct weights in [1, 2) (golden-ratio sequence): moving entries within a row changes
        # the weighted sum, where a plain sum and the norm would stay the same
        j = torch.arange(n, dtype=torch.float64)
        w = (1.0 + torch.remainder(j * 0.6180339887498949, 1.0)).to(like.dtype).to(like.device)
        _ROW_WEIGHTS[key] = w
    return w


def _fingerprint(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-row weighted sum (distinct weight per position) and ℓ2 norm of every parameter
    (rows = first dimension): changes with any realistic edit, permutations of rows or of the
    entries within a row included. Reduced in the parameters' own dtype, which runs at memory
    speed (0.7 ms per forward of 's2d-lite', 20 ms for the 63 M parameters of 'small' on
    2 cores); a float64-accumulated sum takes the scalar path, ~30x slower. Edits below float32
    rounding of a row sum could go unseen; they move T by a relative ~1e-7, far below
    FLOAT_SLACK. An edit built to keep every row's weighted sum and norm would go unseen too:
    the guard is for writes PyTorch cannot track (``.data``, NumPy views), not for adversaries
    holding the weights."""
    # autocast off: under a bf16 autocast the matrix-vector product would round differently from
    # the float32 one, every fingerprint would look like an edit, and T would be recomputed (and
    # the fused weights refolded) on every forward
    with torch.no_grad(), torch.autocast(params[0].device.type, enabled=False):
        parts = []
        for p in params:
            rows = p.reshape(p.shape[0], -1) if p.dim() > 1 else p.reshape(1, -1)
            parts += [rows @ _row_weights(rows.shape[1], rows), torch.linalg.vector_norm(rows, dim=1)]
        return torch.cat(parts)


class _CachedRescaling(LipschitzModule):
    """Caches the inverse rescaling ``2/t`` while no gradient can flow to the parameters.

    In eval-mode inference (and attacks, which need input gradients only) the normalisation is
    computed once and reused until a parameter changes. A change is seen through the parameters'
    version counters (in-place updates, ``load_state_dict``, foreach optimizers), their storage
    (``.to()``, reassignment; the cache keeps the old storage alive so that an address cannot be
    reused) and a global optimizer hook (fused optimizers do not bump versions). Writes through
    ``param.data`` (or a NumPy view) bypass all of these: PyTorch does not track them, so the
    cache also compares a fingerprint of the parameter values (per-row sums and norms, see
    :func:`_fingerprint`) before reusing anything.
    The cached value is always computed in IEEE float32 (no TF32/bf16 matmuls, no autocast),
    whichever path fills it, because certified outputs reuse it. With gradients flowing to the
    parameters (training) it is recomputed on every forward, under the caller's settings.
    """

    def _param_key(self, params: tuple[torch.Tensor, ...]) -> tuple:
        return (_optimizer_generation,) + tuple(
            (p._version, p.data_ptr(), p.dtype, p.device, tuple(p.shape), p.stride()) for p in params
        )

    def _scale(self) -> torch.Tensor:
        params = tuple(self.parameters())
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        device_type = params[0].device.type
        if needs_graph:
            # float32 even under a training autocast: a bf16 Gram matrix can fall below WWᵀ, and
            # the network trained would then not be the 1-Lipschitz one that is saved
            with torch.autocast(device_type, enabled=False):
                return 2.0 * safe_inverse(self._rescaling())
        if any(p.is_inference() for p in params):  # no version counters to watch: never cache
            with torch.no_grad(), _ieee_float32(device_type):
                return 2.0 * safe_inverse(self._rescaling())
        key = self._param_key(params)
        fingerprint = _fingerprint(params)
        cached = self.__dict__.get("_cache")
        if cached is not None and cached[0] == key and torch.equal(cached[3], fingerprint):
            return cached[1]
        # outside inference mode, so that a value cached under it can be saved for backward later
        with torch.inference_mode(False), torch.no_grad(), _ieee_float32(device_type):
            scale = 2.0 * safe_inverse(self._rescaling())
        for p in params:
            _CACHED_PARAMS[id(p)] = p
        self.__dict__["_cache"] = (key, scale, tuple(p.detach() for p in params), fingerprint)
        return scale

    def _drop_cache(self) -> None:
        self.__dict__.pop("_cache", None)

    def _apply(self, fn, recurse: bool = True):
        self._drop_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_cache", None)  # derived data: never pickled or deep-copied
        return state

    def _rescaling(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SLLConv2d(_CachedRescaling):
    """SLL residual convolution ``h(x) = x - 2·𝒦*(T⁻¹ ReLU(𝒦x + b))``, 3×3 kernels, padding 1.

    Bound: 1. The Jacobian is ``I - 2𝒦*T⁻¹D𝒦`` with D a 0/1 diagonal (ReLU); since
    ``T ⪰ 𝒦𝒦*`` (see :func:`sll_conv_rescaling`) its spectral norm is at most 1 (SLL theorem).
    ``inner`` is the bottleneck width (the published ``conv_size``, default 5).
    """

    bound_reason = "SLL residual conv: T ⪰ KK* by diagonal dominance of the kernel Gram stencil"

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
        return sll_conv_rescaling(_at_least_float32(self.kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel.shape[-1] // 2
        scale = self._scale().to(x.dtype)
        kernel = self.kernel.to(x.dtype)
        res = F.conv2d(x, kernel, bias=self.bias.view(-1).to(x.dtype), padding=pad)
        res = F.relu(res, inplace=True) * scale.view(1, -1, 1, 1)
        out = F.conv_transpose2d(res, kernel, padding=pad)
        if _autodiff_free(x, out):
            return torch.sub(x, out, out=out)  # nothing records this step: reuse the buffer
        return x - out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}"


class SLLLinear(_CachedRescaling):
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
        return sll_linear_rescaling(_at_least_float32(self.weight), _at_least_float32(self.q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        res = F.relu(F.linear(x, weight, self.bias.view(-1).to(x.dtype)), inplace=True)
        res = res * self._scale().to(x.dtype)
        return x - res @ weight

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

    All modes are invariant to permutations of positions (so to circular shifts of the map) and
    to horizontal flips. Norms use :func:`safe_sqrt`: exact values, finite gradients at 0.
    """

    bound_reason = "global pooling: sum/√n (Cauchy-Schwarz), per-channel ℓ2 norms (reverse triangle)"
    MODES = ("sum", "norm", "sum_norm", "sum_std")

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
        if self.mode == "sum_std":
            centred = flat - (total / flat.shape[-1]).unsqueeze(-1)
            return torch.cat([total / root_n, safe_sqrt(centred.square().sum(dim=-1))], dim=1)
        norm = safe_sqrt(flat.square().sum(dim=-1))
        if self.mode == "norm":
            return norm
        return torch.cat([total / root_n, norm], dim=1) / math.sqrt(2.0)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"
