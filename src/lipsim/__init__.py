"""lipsim: a provably robust perceptual similarity metric (LipSim, ICLR 2024).

Public face (see docs/api.md): :func:`load`, :func:`create_model`, :func:`load_image`,
:class:`LipSim`. Images are float tensors (B, 3, 224, 224) in [0, 1]; every radius is an ℓ2
norm in that [0, 1] pixel space. Nothing here touches the network.
"""

from __future__ import annotations

from .archs import ArchConfig, list_archs, register
from .certify import Certificate2AFC
from .checkpoints import load, load_published
from .errors import CheckpointError, ImageError, LipSimError
from .images import load_image
from .model import LipSim

__version__ = "0.1.0"

__all__ = [
    "ArchConfig",
    "Certificate2AFC",
    "CheckpointError",
    "ImageError",
    "LipSim",
    "LipSimError",
    "create_model",
    "list_archs",
    "load",
    "load_image",
    "load_published",
    "register",
]


def create_model(
    name: str | ArchConfig, embedding: str = "append", device="cpu", seed: int | None = None
) -> LipSim:
    """An architecture by name (or config) with fresh random weights, in eval mode.

    ``embedding="append"`` (default) makes g 1-Lipschitz; "plain" mimics the published models.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    return LipSim.from_config(name, embedding=embedding).to(device).eval()
