"""Adapter over the ``dreamsim`` pip package (the published LipSim teacher), strictly offline.

``dreamsim(pretrained=True, cache_dir=...)`` downloads its release zip when the expected files are not
in ``cache_dir``. This adapter checks for those files first and refuses to construct the model when
any is missing, so nothing is ever downloaded at run time. The weights folder is, in order: the
``cache_dir`` argument, the ``LIPSIM_DREAMSIM_CACHE`` environment variable, ``~/.cache/lipsim/dreamsim``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from pathlib import Path

import torch

from .base import Teacher, TeacherUnavailable, resize_to

ENV_VAR = "LIPSIM_DREAMSIM_CACHE"
DEFAULT_CACHE = Path("~/.cache/lipsim/dreamsim")
RELEASES = "https://github.com/ssundaram21/dreamsim/releases"
DREAMSIM_SIZE = 224

# Files each DreamSim type needs in its weights folder. Each entry is a group of alternatives; a group
# is satisfied when all names of one alternative exist. The ensemble's LoRA adapters are one folder
# (ensemble_lora) in current releases and three folders in the v0.2.0 checkpoints.
REQUIRED_FILES: dict[str, list[list[tuple[str, ...]]]] = {
    "ensemble": [
        [("dino_vitb16_pretrain.pth",)],
        [("open_clip_vitb16_pretrain.pth.tar",)],
        [("clip_vitb16_pretrain.pth.tar",)],
        [("ensemble_lora",), ("dino_vitb16_lora", "open_clip_vitb16_lora", "clip_vitb16_lora")],
    ],
    "dino_vitb16": [[("dino_vitb16_pretrain.pth",)], [("dino_vitb16_single_lora",)]],
    "dinov2_vitb14": [[("dinov2_vitb14_pretrain.pth",)], [("dinov2_vitb14_single_lora",)]],
    "clip_vitb32": [[("clip_vitb32_pretrain.pth.tar",)], [("clip_vitb32_single_lora",)]],
    "open_clip_vitb32": [[("open_clip_vitb32_pretrain.pth.tar",)], [("open_clip_vitb32_single_lora",)]],
    "synclr_vitb16": [[("synclr_vit_b_16.pth",)], [("synclr_vitb16_single_lora",)]],
}
# Embedding sizes (DreamSim's EMBED_DIMS for the feature each type uses); the ensemble is DINO CLS 768
# + CLIP 512 + OpenCLIP 512, the 1792-d target of the published LipSim distillation.
EMBED_DIM = {
    "ensemble": 1792,
    "dino_vitb16": 768,
    "dinov2_vitb14": 768,
    "clip_vitb32": 512,
    "open_clip_vitb32": 512,
    "synclr_vitb16": 768,
}


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_VAR) or DEFAULT_CACHE
    return Path(cache_dir).expanduser()


def missing_weight_files(cache_dir: Path, dreamsim_type: str) -> list[str]:
    """Names (first alternative of each unsatisfied group) not present in ``cache_dir``."""
    missing = []
    for group in REQUIRED_FILES[dreamsim_type]:
        if not any(all((cache_dir / name).exists() for name in alternative) for alternative in group):
            missing.extend(group[0])
    return missing


class DreamSimTeacher(Teacher):
    """DreamSim embedding ``model.embed(x)`` of 224x224 inputs (resized bilinearly when needed).

    The embedding is returned exactly as the installed DreamSim computes it with
    ``normalize_embeds=True``. That order changed (docs/method.md §3): releases up to 0.2.0,
    and the copy vendored in the LipSim code that made the published targets, divide by the norm
    and then centre (norms at most 1); later releases centre and then divide (unit norm). The
    published targets are reproduced only with a release up to 0.2.0.
    """

    def __init__(
        self, dreamsim_type: str = "ensemble", device: str | torch.device = "cpu", cache_dir=None
    ) -> None:
        super().__init__()
        if dreamsim_type not in REQUIRED_FILES:
            known = ", ".join(sorted(REQUIRED_FILES))
            raise ValueError(f"unknown DreamSim type {dreamsim_type!r}; known: {known}")
        try:
            package = importlib.import_module("dreamsim")
        except ImportError:
            raise TeacherUnavailable(
                "teacher 'dreamsim' needs the dreamsim package, which is not installed: pip install "
                f"dreamsim (its weights must then be in {resolve_cache_dir(cache_dir)}, see docs/training.md)"
            ) from None
        folder = resolve_cache_dir(cache_dir)
        missing = missing_weight_files(folder, dreamsim_type)
        if missing:
            raise FileNotFoundError(
                f"DreamSim weights not found in {folder} (missing: {', '.join(missing)}); download the "
                f"checkpoint zip for '{dreamsim_type}' from {RELEASES} and unzip it there, or point "
                f"{ENV_VAR} / cache_dir at the folder that holds them"
            )
        kwargs = {
            "pretrained": True,
            "cache_dir": str(folder),
            "device": str(device),
            "normalize_embeds": True,
        }
        if dreamsim_type != "ensemble":  # older releases have no dreamsim_type argument
            kwargs["dreamsim_type"] = dreamsim_type
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using cached ..."
            model, _ = package.dreamsim(**kwargs)
        self.model = model
        self.dreamsim_type = dreamsim_type
        self.name = "dreamsim" if dreamsim_type == "ensemble" else f"dreamsim:{dreamsim_type}"
        self.dim = int(getattr(model, "embed_size", EMBED_DIM[dreamsim_type]))
        # DreamSim keeps its backbones in a plain list, invisible to parameters() and .to(): record
        # the device they were built on.
        self._device = torch.device(device)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self._device

    def embed_checked(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to(x, DREAMSIM_SIZE)
        return self.model.embed(x).reshape(x.shape[0], -1)
