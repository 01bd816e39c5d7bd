"""The normalised embedding ``g = z/‖z‖``, written once for every caller and both backends.

``z = [f; 1]`` ("append" mode, ours: g is 1-Lipschitz, docs/method.md §3) or ``z = f`` ("plain",
the published checkpoints). The same function serves the torch model (float32, differentiable),
the certificates (float64 NumPy: the same function on a wider dtype), the NumPy engine, retrieval
and training. Torch-free: torch tensors are handled through their own methods and the already
imported ``torch`` module, so importing this module never imports torch.
"""

from __future__ import annotations

import sys

import numpy as np

from .spec import EMBEDDINGS

__all__ = ["normalise", "NORM_FLOOR"]

#: norms below this are treated as this (a zero feature vector in plain mode gives g = 0)
NORM_FLOOR = 1e-12


def normalise(f, embedding: str):
    """``g = z / max(‖z‖, NORM_FLOOR)`` row by row for features f (B, k), in f's own type
    (torch tensor or NumPy array), dtype and device; differentiable for torch tensors."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding mode {embedding!r} (choose from {', '.join(EMBEDDINGS)})")
    if type(f).__module__.split(".", 1)[0] == "torch":
        torch = sys.modules["torch"]
        z = torch.cat([f, torch.ones_like(f[:, :1])], dim=1) if embedding == "append" else f
        return z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(NORM_FLOOR)
    f = np.asarray(f)
    z = np.concatenate([f, np.ones_like(f[:, :1])], axis=1) if embedding == "append" else f
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), NORM_FLOOR)
