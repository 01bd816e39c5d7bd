"""The teacher interface: a frozen image network that maps images to embeddings.

Input contract (every teacher): ``x`` is a float tensor ``(B, 3, H, W)``, RGB, values in **[0, 1]**,
``H, W >= 32``. A teacher normalises internally (ImageNet mean/std for the offline CNNs) and resizes
only when its network needs a fixed size. Output: ``(B, dim)`` float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LipSimError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 32
RANGE_TOLERANCE = 1e-4  # float noise from resizing/augmentation may overshoot [0, 1] slightly


class TeacherUnavailable(LipSimError, ImportError):
    """A teacher whose package or weights are not installed; the message says what to install."""


def check_images(x: torch.Tensor) -> None:
    """Raise ValueError (one line) unless ``x`` is a finite (B, 3, H, W) float batch in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
    if min(x.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE}, got {x.shape[-2]}x{x.shape[-1]}")
    if x.numel() == 0:
        raise ValueError("empty image batch")
    lo, hi = torch.aminmax(x.detach())
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError("images contain NaN or Inf")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"image values must lie in [0, 1], got [{lo.item():.4g}, {hi.item():.4g}]")


def resize_to(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear (antialiased) resize to ``size x size``; identity when ``size`` is None or already met."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def unit(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


class Teacher(nn.Module):
    """Base class: a frozen network, always in eval mode, run without autograd.

    Subclasses set ``name`` and ``dim`` and implement ``embed_checked(x)`` for validated input.
    ``forward`` checks the input contract, runs under ``torch.no_grad()`` and returns float32.
    Calling ``.train()`` on a teacher (or on a module that contains one) leaves it in eval mode, so
    batch-norm statistics never move during distillation.
    """

    name: str = "teacher"
    dim: int = 0

    def freeze(self) -> Teacher:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Ignores ``mode``: a teacher is never put in training mode."""
        return super().train(False)

    def embed_checked(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        with torch.no_grad():
            out = self.embed_checked(x)
        return out.float().reshape(x.shape[0], -1)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}"


class ImageNetNormalize(nn.Module):
    """(x - mean) / std with the ImageNet statistics, as buffers so they follow ``.to(device)``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
