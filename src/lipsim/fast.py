"""The SLL-convolution kernel sets of the frozen engine: the same function, fewer passes over memory.

:mod:`lipsim.engine` folds an SLL convolution once into ``(s·K, s·b, -flip(K)ᵀ)``
(:func:`lipsim.layers.fold_sll_conv`); this module packs those folded weights for one kernel set
(:func:`pack`) and runs ``x ← x - 𝒦*(s·ReLU(𝒦x + b))`` in x's own channels-last buffer
(:func:`sll_conv_inplace`). Every set computes the same function (an identity of real
arithmetic; float32 agrees with the plain layer to a relative 1e-5):

* "portable": PyTorch's ``conv2d`` + ``relu_`` + ``conv2d`` + ``add_`` (cuDNN on GPUs) —
  :func:`lipsim.layers.sll_conv` itself;
* "mkldnn" (automatic on CPUs): oneDNN post-op fusion (bias and ReLU inside the first
  convolution, the residual sum inside the second; ``torch.ops.mkldnn``, private PyTorch
  operators), kernels pre-packed once into oneDNN's blocked layout;
* "triton" (CUDA, float32, opt-in until measured on a GPU): two Triton kernels
  (:mod:`lipsim.triton_kernels`), IEEE float32 dots, no TF32.

So each SLL convolution reads the activation twice and writes it once. A non-portable set is
used only after a self-check against the portable kernels on the running machine succeeded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import triton_kernels
from .layers import SLLConv2d, fold_sll_conv, sll_conv

__all__ = ["KERNEL_SETS", "KERNELS_ENV", "kernels_for", "use_kernels", "pack", "sll_conv_inplace"]

_CL = torch.channels_last


def pack(kernels: str, k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, x: torch.Tensor) -> tuple:
    """Folded weights laid out for ``kernels`` in x's dtype (oneDNN's blocked layout for
    "mkldnn", valid for any batch size; tap by tap for "triton")."""
    dtype = x.dtype
    with torch.inference_mode(False), torch.no_grad():
        if kernels == "triton":
            return triton_kernels.pack_weights(k1, b1, k2)
        k1 = k1.to(dtype).contiguous(memory_format=_CL)
        b1 = b1.to(dtype)
        k2 = k2.to(dtype).contiguous(memory_format=_CL)
        if kernels == "mkldnn":
            pad = k1.shape[-1] // 2
            p, one = [pad, pad], [1, 1]
            size = list(x.shape)
            k1 = torch.ops.mkldnn._reorder_convolution_weight(k1, p, one, one, 1, size)
            k2 = torch.ops.mkldnn._reorder_convolution_weight(
                k2, p, one, one, 1, [size[0], k2.shape[1]] + size[2:]
            )
            return k1, b1, k2, pad
        return k1, b1, k2


def _conv_mkldnn(x: torch.Tensor, k1, b1, k2, pad: int) -> torch.Tensor:
    ops = torch.ops.mkldnn
    p, one = [pad, pad], [1, 1]
    res = ops._convolution_pointwise(x, k1, b1, p, one, one, 1, "relu", [], "")
    return ops._convolution_pointwise_.binary(x, res, k2, None, p, one, one, 1, "add", None, None, [], None)


def sll_conv_inplace(kernels: str, x: torch.Tensor, packed: tuple) -> torch.Tensor:
    """``x ← x - 𝒦*(s·ReLU(𝒦x + b))`` in x's own (channels-last) buffer, with :func:`pack`'s weights."""
    if kernels == "mkldnn":
        return _conv_mkldnn(x, *packed)
    if kernels == "triton":
        return triton_kernels.sll_conv_(x, *packed)
    return sll_conv(x, *packed, into_x=True)


def space_to_depth_cl(x: torch.Tensor, r: int) -> torch.Tensor:
    """``pixel_unshuffle(x, r)`` written straight into a new channels-last buffer (one pass)."""
    b, c, h, w = x.shape
    if h % r or w % r:
        return F.pixel_unshuffle(x, r)  # let the plain op raise its own error
    out = torch.empty((b, h // r, w // r, c, r, r), dtype=x.dtype, device=x.device)
    out.copy_(x.reshape(b, c, h // r, r, w // r, r).permute(0, 2, 4, 1, 3, 5))
    return out.view(b, h // r, w // r, c * r * r).permute(0, 3, 1, 2)


def zero_pad_cl(x: torch.Tensor, channels: int) -> torch.Tensor:
    """:class:`lipsim.layers.ZeroChannelPad` into a new channels-last buffer."""
    b, c, h, w = x.shape
    if c > channels:
        raise ValueError(f"cannot pad {c} channels down to {channels}")
    out = torch.empty((b, channels, h, w), dtype=x.dtype, device=x.device, memory_format=_CL).zero_()
    out[:, :c].copy_(x)
    return out


#: self-check results, by (kernel set, device, dtype)
_KERNEL_STATUS: dict[tuple[str, str, torch.dtype], bool] = {}
#: ``LIPSIM_KERNELS=portable|mkldnn|triton`` forces a kernel set (still self-checked; tests use
#: ``triton`` with ``TRITON_INTERPRET=1`` to run the Triton kernels on the CPU)
KERNELS_ENV = "LIPSIM_KERNELS"


def _self_check(kernels: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``kernels`` run here and agree with the portable kernels on a small random layer
    (checked once per kernel set, device and dtype in a process)."""
    key = (kernels, str(device), dtype)
    if key in _KERNEL_STATUS:
        return _KERNEL_STATUS[key]
    ok = False
    try:
        if kernels == "mkldnn":
            if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
                raise RuntimeError("no oneDNN for this dtype")
            if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                raise RuntimeError("no bf16 support")
        elif kernels == "triton":
            if not triton_kernels.available() or dtype != torch.float32:
                raise RuntimeError("no Triton kernels for this dtype")
        gen = torch.Generator().manual_seed(0)
        layer = SLLConv2d(13, 5)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        layer.requires_grad_(False).to(device)
        x = torch.randn(2, 13, 9, 11, generator=gen).to(device, dtype).contiguous(memory_format=_CL)
        with torch.no_grad():
            folded = fold_sll_conv(layer.kernel, layer.bias, layer.scale())
            a = sll_conv_inplace(kernels, x.clone(memory_format=_CL), pack(kernels, *folded, x)).float()
            b = sll_conv_inplace("portable", x.clone(memory_format=_CL), pack("portable", *folded, x))
            b = b.float()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        ok = bool(torch.isfinite(a).all()) and float((a - b).norm() / b.norm()) <= tol
    except (RuntimeError, AttributeError, NotImplementedError, ImportError, ValueError):
        ok = False
    _KERNEL_STATUS[key] = ok
    return ok


_forced_kernels: str | None = None
KERNEL_SETS = ("portable", "mkldnn", "triton")


@contextlib.contextmanager
def use_kernels(kernels: str | None) -> Iterator[None]:
    """Within the block, prefer ``kernels`` ("portable", "mkldnn", "triton"; None: automatic) for
    the frozen engine, as :data:`KERNELS_ENV` does process-wide. A set that fails its self-check
    here still falls back to the portable kernels."""
    global _forced_kernels
    if kernels is not None and kernels not in KERNEL_SETS:
        raise ValueError(f"kernels must be one of {KERNEL_SETS} or None, got {kernels!r}")
    saved, _forced_kernels = _forced_kernels, kernels
    try:
        yield
    finally:
        _forced_kernels = saved


def kernels_for(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Which SLL-convolution kernels the frozen engine uses for ``device``/``dtype``.

    Automatic choice: "mkldnn" on CPUs (oneDNN post-op fusion), "portable" (PyTorch ops) elsewhere.
    The Triton kernels (CUDA, float32, :mod:`lipsim.triton_kernels`) are opt-in, through
    :func:`use_kernels` or ``LIPSIM_KERNELS=triton``, until a GPU benchmark shows them faster
    than cuDNN. A non-portable set is used only after it passed its self-check here."""
    device = torch.device(device)
    forced = _forced_kernels or os.environ.get(KERNELS_ENV, "").strip().lower()
    if forced in KERNEL_SETS:
        candidate = forced
    else:
        candidate = "mkldnn" if device.type == "cpu" else "portable"
    if candidate == "portable" or _self_check(candidate, device, dtype):
        return candidate
    return "portable"
