"""Precision policy: what may run in reduced precision and what must stay IEEE float32.

One place decides it (docs/method.md, "float rounding"; DEVELOPERS.md, "Certificates are
promises"):

* **Certified outputs** (features, embeddings, distances, intervals, radii) are computed in IEEE
  float32 or wider: autocast off and no TF32/bf16 matmul or convolution precision, whatever the
  caller set globally (:func:`exact_float32`). The certificate arithmetic itself runs in float64
  (:mod:`lipsim.certify`).
* **SLL rescalings** ``t`` (and so ``s = 2/t``) are computed from weights of at least float32
  (:func:`at_least_float32`) with autocast off, in training too: a Gram matrix summed in 16 bits
  can fall below ``WWᵀ``, and the layer would no longer be 1-Lipschitz. Outside training (the
  frozen engine's fold, which certified outputs use) also under :func:`ieee_float32`.
* **Reduced precision** (bf16, fp16 on GPUs) may rank and retrieve (:func:`reduced`, used by
  ``embed_fast``) and may train (:func:`amp_dtype`, the ``--amp`` modes), never certify.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["exact_float32", "ieee_float32", "at_least_float32", "reduced", "amp_dtype", "CERTIFIED_DTYPES"]

#: dtypes a certified forward may run in
CERTIFIED_DTYPES = (torch.float32, torch.float64)

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
def ieee_float32(device_type: str) -> Iterator[None]:
    """IEEE float32 arithmetic for the block on ``device_type`` whatever the caller set globally
    (TF32, bf16 "medium" matmul precision, autocast); every setting is restored afterwards."""
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


@contextlib.contextmanager
def exact_float32(device_type: str | None = None) -> Iterator[None]:
    """IEEE float32 for the block: autocast off (CPU, CUDA and ``device_type``, the device the
    work runs on), no TF32/bf16 matmul or conv precision, whatever the caller set (legacy or
    per-backend API); restored exactly afterwards."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if device_type is not None and device_type not in types:
        types.append(device_type)
    with contextlib.ExitStack() as stack:
        for kind in types:
            stack.enter_context(ieee_float32(kind))
        yield


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is held in a narrower float type (fp16/bf16 parameters); the upcast
    is exact, so the layer still computes with the stored weights."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


@contextlib.contextmanager
def reduced(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """The reduced-precision forward of ``embed_fast`` (ranking and retrieval, never certified):
    autocast to ``dtype`` on ``device_type``."""
    with torch.autocast(device_type, dtype=dtype):
        yield


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype of an ``--amp`` mode on ``device`` (None: no autocast; CUDA
    only, CPU training always runs in float32)."""
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            raise ValueError(f"mixed precision ({mode}) is only used on CUDA; this run is on {device}")
        return None
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
