"""Triton kernels for the SLL convolution on GPUs (a kernel set of the frozen engine, :mod:`lipsim.fast`).

One SLL convolution ``x ← x - 𝒦*(s·ReLU(𝒦x + b))`` runs as two kernels over channels-last
activations, each an implicit GEMM over the nine 3×3 taps:

1. ``res = ReLU(conv(x, s·K) + s·b)``: reads x once (its halo from cache), writes the narrow
   ``inner``-channel result (bias, ReLU and the rescaling fused; no separate passes);
2. ``x ← x + conv(res, -flip(K)ᵀ)``: reads res and x, writes x in place (the transposed
   convolution and the residual fused; each program reads and writes only its own block of x).

Against cuDNN's ``conv2d`` + ``relu_`` + ``conv2d`` + ``add_`` this saves the passes of the ReLU and
of the residual add over the activation. The function is the same: tests compare it with the
portable PyTorch path in Triton's interpreter (``TRITON_INTERPRET=1``, CPU) in CI, and
:mod:`lipsim.fast` runs a self-check against the portable kernels on the GPU before first use.

Precision: the certified float32 path must not use TF32, which ``tl.dot`` uses for float32 by
default; every dot here passes ``input_precision="ieee"``. Only float32 is supported (bf16 uses
the portable kernels).

Channel counts need not be multiples of 16 (the published ``small`` has 45 channels and inner
width 5): blocks are padded to powers of two ≥ 16, as ``tl.dot`` needs, and masked.
"""

from __future__ import annotations

import torch

try:  # Triton ships with the CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["available", "pack_weights", "sll_conv_"]

BLOCK_P = 64  # pixels per program


def available() -> bool:
    return triton is not None


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _pixels(pid, n_pix, H, W, BLOCK_P: tl.constexpr):
        """This program's pixels (flat indices), their validity, and (image, row, column)."""
        p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        hw = p % (H * W)
        return p, p < n_pix, p // (H * W), hw // W, hw % W

    @triton.jit
    def _neighbour(n, h, w, p_ok, tap, H, W, KS: tl.constexpr):
        """Flat index of the pixel under ``tap`` of the KS×KS stencil, and whether it lies inside
        the image (outside: the zero padding)."""
        hh = h + tap // KS - KS // 2
        ww = w + tap % KS - KS // 2
        inside = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        return (n * H + hh) * W + ww, inside

    @triton.jit
    def _res_kernel(
        x_ptr, w_ptr, b_ptr, res_ptr, n_pix, H, W, C, INNER,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, KS: tl.constexpr,
    ):  # fmt: skip
        """res[p, i] = ReLU(Σ_tap Σ_c x[p + tap, c]·w[tap, c, i] + b[i]); x, res channels-last."""
        p, p_ok, n, h, w = _pixels(tl.program_id(0), n_pix, H, W, BLOCK_P)
        ci = tl.arange(0, BLOCK_I)
        i_ok = ci < INNER
        acc = tl.zeros((BLOCK_P, BLOCK_I), dtype=tl.float32)
        for tap in range(KS * KS):
            q, inside = _neighbour(n, h, w, p_ok, tap, H, W, KS)
            base = q * C
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                c_ok = cc < C
                x_mask = inside[:, None] & c_ok[None, :]
                xb = tl.load(x_ptr + base[:, None] + cc[None, :], mask=x_mask, other=0.0)
                wb = tl.load(
                    w_ptr + (tap * C + cc[:, None]) * INNER + ci[None, :],
                    mask=c_ok[:, None] & i_ok[None, :],
                    other=0.0,
                )
                acc += tl.dot(xb, wb, input_precision="ieee")
        acc += tl.load(b_ptr + ci, mask=i_ok, other=0.0)[None, :]
        acc = tl.maximum(acc, 0.0)
        tl.store(res_ptr + p[:, None] * INNER + ci[None, :], acc, mask=p_ok[:, None] & i_ok[None, :])

    @triton.jit
    def _out_kernel(
        x_ptr, res_ptr, w_ptr, n_pix, H, W, C, INNER,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, KS: tl.constexpr,
    ):  # fmt: skip
        """x[p, c] += Σ_tap Σ_i res[p + tap, i]·w[tap, i, c] (in place; w holds -flip(K)ᵀ)."""
        p, p_ok, n, h, w = _pixels(tl.program_id(0), n_pix, H, W, BLOCK_P)
        cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        ci = tl.arange(0, BLOCK_I)
        i_ok = ci < INNER
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for tap in range(KS * KS):
            q, inside = _neighbour(n, h, w, p_ok, tap, H, W, KS)
            rb = tl.load(
                res_ptr + q[:, None] * INNER + ci[None, :],
                mask=inside[:, None] & i_ok[None, :],
                other=0.0,
            )
            w_mask = i_ok[:, None] & c_ok[None, :]
            wb = tl.load(w_ptr + (tap * INNER + ci[:, None]) * C + cc[None, :], mask=w_mask, other=0.0)
            acc += tl.dot(rb, wb, input_precision="ieee")
        mask = p_ok[:, None] & c_ok[None, :]
        ptrs = x_ptr + p[:, None] * C + cc[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, acc, mask=mask)


def pack_weights(k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor) -> tuple:
    """``(w1, b1, w2)`` for :func:`sll_conv_` from an SLL layer's folded weights
    (:func:`lipsim.layers.fold_sll_conv`: ``s·K`` (inner, C, k, k), ``s·b``, ``-flip(K)ᵀ``):
    ``w1[tap] = (s·K)[:, :, u, v]ᵀ`` (C, inner), ``w2[tap] = (-flip(K)ᵀ)[:, :, u, v]ᵀ`` (inner, C),
    taps in row-major (u, v) order."""
    inner, channels, k, _ = k1.shape
    w1 = k1.permute(2, 3, 1, 0).reshape(k * k, channels, inner).contiguous().float()
    w2 = k2.permute(2, 3, 1, 0).reshape(k * k, inner, channels).contiguous().float()
    return w1, b1.reshape(-1).contiguous().float(), w2


def sll_conv_(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x ← x - 𝒦*(s·ReLU(𝒦x + b))`` in place on a channels-last float32 (N, C, H, W) tensor,
    with weights from :func:`pack_weights`; returns x."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("sll_conv_ takes a channels-last float32 tensor")
    n, c, h, w = x.shape
    taps, c_w, inner = w1.shape
    ks = int(round(taps**0.5))
    if c_w != c or ks * ks != taps or w2.shape != (taps, inner, c):
        raise ValueError("weights do not match the activation")
    per_image = h * w * max(c, inner)
    chunk = max(1, (2**31 - 1) // per_image)  # 32-bit offsets inside the kernels
    if n > chunk:
        for start in range(0, n, chunk):
            sll_conv_(x[start : start + chunk], w1, b1, w2)
        return x
    n_pix = n * h * w
    res = torch.empty((n, h, w, inner), dtype=torch.float32, device=x.device)
    block_c = min(_pow2_at_least_16(c), 64)
    block_i = _pow2_at_least_16(inner)
    grid = (triton.cdiv(n_pix, BLOCK_P),)
    _res_kernel[grid](x, w1, b1, res, n_pix, h, w, c, inner, BLOCK_P, block_c, block_i, ks)
    grid = (triton.cdiv(n_pix, BLOCK_P), triton.cdiv(c, block_c))
    _out_kernel[grid](x, res, w2, n_pix, h, w, c, inner, BLOCK_P, block_c, block_i, ks)
    return x
