"""The two student views of the distillation stage (docs/method.md §6.1).

``DistillViews(mode)(image, generator)`` returns ``(view_a, view_b)``, two (3, 224, 224) float32
tensors in [0, 1]:

* ``"published"`` (the reference ``DataAugmentationDINO``): view a = CenterCrop(224) at the
  image's own resolution (zero padding when a side is shorter than 224) + random horizontal flip;
  view b = the same crop and flip + ColorJitter(0.4, 0.4, 0.2, 0.1) with probability 0.8 +
  RandomGrayscale with probability 0.2. Meant for ImageNet-sized photos.
* ``"random-resized"`` (for small photo corpora, where a fixed centre crop would show the model
  a handful of pictures): view a = RandomResizedCrop(224, scale=(0.25, 1), ratio=(3/4, 4/3),
  bicubic) + random horizontal flip; view b = view a with the same colour pipeline as above.

In both modes view b shares view a's geometry, so one teacher target serves both views. The
teacher target is computed on **view a** (the [HEAD] reference behaviour; the paper's
precomputed variant used the un-flipped centre crop). Randomness comes only from the
``generator`` argument, so a view is reproducible from a seed whatever process computes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ._io import pil_to_tensor
from .folders import ImageFolderDataset

__all__ = ["DistillViews", "DistillDataset", "VIEW_MODES", "color_jitter", "random_resized_box"]

VIEW_MODES = ("published", "random-resized")


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
) -> torch.Tensor:
    """torchvision's ColorJitter on a (3, H, W) tensor in [0, 1]: the four factors are drawn
    uniformly (brightness, contrast, saturation in [1 - v, 1 + v], hue in [-v, v]) and applied
    in a random order."""
    factors = [
        _uniform(generator, 1 - brightness, 1 + brightness),
        _uniform(generator, 1 - contrast, 1 + contrast),
        _uniform(generator, 1 - saturation, 1 + saturation),
        _uniform(generator, -hue, hue),
    ]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in torch.randperm(4, generator=generator).tolist():
        x = ops[k](x, factors[k])
    return x.clamp(0.0, 1.0)


def random_resized_box(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: area fraction uniform in ``scale``, aspect
    log-uniform in ``ratio``; ten tries, then the largest centred box within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DistillViews:
    """Callable ``(image, generator=None) -> (view_a, view_b)``; see the module docstring.

    ``image`` is a PIL image or a (3, H, W) tensor in [0, 1]; without a generator the global
    torch RNG is used.
    """

    def __init__(self, mode: str = "published", size: int = 224):
        if mode not in VIEW_MODES:
            raise ValueError(f"unknown view mode {mode!r} (choose from {', '.join(VIEW_MODES)})")
        self.mode = mode
        self.size = int(size)

    def cache_view(self, image) -> torch.Tensor:
        """The deterministic view an embedding cache should hold for ``image`` (a PIL image or a
        (3, H, W) tensor): view a's geometry without its random flip. "published": the centre
        crop at native resolution, exactly view a's crop; "random-resized": the whole image
        resized to ``size`` (the crops then vary around it, and the target does not follow
        them). Use it as the transform of the dataset a cache is built from
        (``ImageFolderDataset(root, transform=DistillViews(mode).cache_view)``)."""
        s = self.size
        if self.mode == "published":
            crop = TF.center_crop(image, [s, s])
        else:
            crop = TF.resize(image, [s, s], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return pil_to_tensor(crop) if isinstance(crop, Image.Image) else crop.float().clamp(0.0, 1.0)

    def geometry(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        """View a: the crop (and flip) of ``image`` as a (3, size, size) tensor."""
        s = self.size
        if self.mode == "published":
            crop = TF.center_crop(image, [s, s])
        else:
            if isinstance(image, Image.Image):
                width, height = image.size
            else:
                height, width = image.shape[-2:]
            top, left, h, w = random_resized_box(width, height, generator)
            crop = TF.resized_crop(
                image, top, left, h, w, [s, s], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        x = pil_to_tensor(crop) if isinstance(crop, Image.Image) else crop.float().clamp(0.0, 1.0)
        if float(torch.rand((), generator=generator)) < 0.5:
            x = TF.hflip(x)
        return x.contiguous()

    def colour(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """View b from view a: ColorJitter(0.4, 0.4, 0.2, 0.1) w.p. 0.8, then grayscale w.p. 0.2."""
        if float(torch.rand((), generator=generator)) < 0.8:
            x = color_jitter(x, generator)
        if float(torch.rand((), generator=generator)) < 0.2:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        return x.contiguous()

    def __call__(self, image, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        view_a = self.geometry(image, generator)
        return view_a, self.colour(view_a, generator)

    def __repr__(self) -> str:
        return f"DistillViews(mode={self.mode!r}, size={self.size})"


class DistillDataset:
    """Distillation pairs over an image folder: item ``i`` is
    ``{"view_a": (3, 224, 224), "view_b": (3, 224, 224), "key": str}`` (tensors in [0, 1]).

    ``source`` is an :class:`ImageFolderDataset` (its ``skip_unreadable`` setting applies) or a
    folder path (read with ``skip_unreadable=True``). The views of item ``i`` depend only on
    ``(seed, epoch, i)``: call :meth:`set_epoch` each epoch for fresh augmentations. The
    teacher target belongs to ``view_a``; ``view_b`` is regressed onto the same target.
    """

    def __init__(
        self,
        source: ImageFolderDataset | str | os.PathLike,
        mode: str = "published",
        seed: int = 0,
        size: int = 224,
    ):
        if isinstance(source, ImageFolderDataset):
            self.folder = source
        else:
            self.folder = ImageFolderDataset(source, size=size, skip_unreadable=True)
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.views = DistillViews(mode, size)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def mode(self) -> str:
        return self.views.mode

    @property
    def keys(self) -> Sequence[str]:
        return self.folder.keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.folder)

    def _generator(self, index: int) -> torch.Generator:
        # SeedSequence mixes (seed, epoch, index) into well-separated streams
        state = np.random.SeedSequence([self.seed, self.epoch, index % len(self)]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def __getitem__(self, index: int) -> dict:
        image, key = self.folder.read_pil(index)
        # One thread, as in a DataLoader worker: some colour operations reduce over the image,
        # and a reduction's float rounding depends on how many threads share it. Pinning the
        # count makes a view bit-identical whichever process computes it (resume with or
        # without workers reaches the same weights).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            view_a, view_b = self.views(image, self._generator(index))
        finally:
            torch.set_num_threads(threads)
        return {"view_a": view_a, "view_b": view_b, "key": key}

    def __repr__(self) -> str:
        return f"DistillDataset(n={len(self)}, mode={self.mode!r}, seed={self.seed})"
