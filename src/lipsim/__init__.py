"""lipsim: a provably robust perceptual similarity metric (LipSim, ICLR 2024).

Public face (see docs/api.md): :func:`load` and :func:`save`, :func:`create_model`,
:func:`load_image`, :class:`LipSim`. Images are float tensors (B, 3, 224, 224) in [0, 1]; every
radius is an ℓ2 norm in that [0, 1] pixel space. Nothing here touches the network.

The names are imported on first use (PEP 562), so ``import lipsim`` and the command line's
torch-free path (``lipsim distance``/``compare`` with the NumPy engine) do not pay for importing
torch; ``lipsim.LipSim`` and friends load it when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS = {
    "ArchConfig": "spec",
    "list_archs": "spec",
    "register": "spec",
    "Certificate2AFC": "certify",
    "load": "checkpoints",
    "load_published": "checkpoints",
    "save": "checkpoints",
    "CheckpointError": "errors",
    "ImageError": "errors",
    "LipSimError": "errors",
    "load_image": "images",
    "preprocess": "images",
    "LipSim": "model",
}

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
    "preprocess",
    "register",
    "save",
]

if TYPE_CHECKING:  # pragma: no cover
    from .certify import Certificate2AFC
    from .checkpoints import load, load_published, save
    from .errors import CheckpointError, ImageError, LipSimError
    from .images import load_image, preprocess
    from .model import LipSim
    from .spec import ArchConfig, list_archs, register


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lipsim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def create_model(
    name: str | ArchConfig, embedding: str = "append", device="cpu", seed: int | None = None
) -> LipSim:
    """An architecture by name (or config) with fresh random weights, in eval mode.

    ``embedding="append"`` (default) makes g 1-Lipschitz; "plain" mimics the published models.
    """
    import torch

    from .devices import usable_device
    from .model import LipSim

    device = usable_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    return LipSim.from_config(name, embedding=embedding).to(device).eval()
