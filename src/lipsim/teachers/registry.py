"""Teachers by name: ``get_teacher("offline-ensemble")``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .base import Teacher
from .cache import CachedTeacher
from .cnn import MULTISTAGE, EfficientNetLiteTeacher, EnsembleTeacher, MobileNetV2Teacher


def _offline_ensemble() -> Teacher:
    members = [MobileNetV2Teacher(stages=MULTISTAGE), EfficientNetLiteTeacher(0)]
    return EnsembleTeacher(members, name="offline-ensemble")


_FACTORIES: dict[str, Callable[[], Teacher]] = {
    "mobilenet_v2": lambda: MobileNetV2Teacher(stages=(18,)),
    "mobilenet_v2-multistage": lambda: MobileNetV2Teacher(stages=MULTISTAGE),
    "efficientnet_lite0": lambda: EfficientNetLiteTeacher(0),
    "efficientnet_lite1": lambda: EfficientNetLiteTeacher(1),
    "efficientnet_lite2": lambda: EfficientNetLiteTeacher(2),
    "offline-ensemble": _offline_ensemble,
}
# "ensemble" means the offline ensemble here; the published DreamSim ensemble is "dreamsim".
_ALIASES = {
    "ensemble": "offline-ensemble",
    "mobilenetv2": "mobilenet_v2",
    "mobilenet-v2": "mobilenet_v2",
    "efficientnet-lite0": "efficientnet_lite0",
    "efficientnet-lite1": "efficientnet_lite1",
    "efficientnet-lite2": "efficientnet_lite2",
}
DREAMSIM_PREFIX = "dreamsim"


def available_teachers() -> list[str]:
    """Canonical names get_teacher accepts (besides aliases and embedding-cache folders)."""
    from .dreamsim import REQUIRED_FILES

    names = [*_FACTORIES, "dreamsim"]
    names += [f"dreamsim:{t}" for t in REQUIRED_FILES if t != "ensemble"]
    return names


def get_teacher(
    name: str | os.PathLike, device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None
) -> Teacher:
    """A frozen teacher in eval mode on ``device``.

    ``name`` is one of ``available_teachers()`` (``mobilenet_v2``, ``mobilenet_v2-multistage``,
    ``efficientnet_lite0/1/2``, ``offline-ensemble`` alias ``ensemble``, ``dreamsim`` or
    ``dreamsim:<type>``) or the path of a folder holding an embedding cache (a ``CachedTeacher``).
    ``cache_dir`` is where DreamSim's weights are (see ``dreamsim.py``); the offline CNNs load theirs
    from their pip packages and ignore it.
    """
    text = os.fspath(name)
    key = text.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _FACTORIES:
        return _FACTORIES[key]().to(device)
    if key == DREAMSIM_PREFIX or key.startswith(DREAMSIM_PREFIX + ":"):
        from .dreamsim import DreamSimTeacher

        dreamsim_type = key.partition(":")[2] or "ensemble"
        return DreamSimTeacher(dreamsim_type, device=device, cache_dir=cache_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return CachedTeacher(path)
    if isinstance(name, os.PathLike) or os.sep in text or text.startswith("."):
        raise FileNotFoundError(f"no embedding-cache folder at {path}")
    raise ValueError(
        f"unknown teacher {text!r}; choose one of {', '.join(available_teachers())} or a cache folder"
    )
