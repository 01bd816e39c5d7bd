"""LipSim as a ``torchmetrics.Metric`` (optional extra: ``pip install 'lipsim[torchmetrics]'``).

:class:`LipSimDistance` is used like torchmetrics' own LPIPS class: ``update(img1, img2)`` adds a
batch, ``compute()`` reduces every distance seen ("mean", "sum" or "none"), and calling the metric
returns the batch's value with gradients, so it serves as a training loss (the accumulated state
holds detached values: no graph outlives its step). Unlike LPIPS, whose
distance takes a square root of a sum of squares (NaN gradients when the two images are equal),
``d = 1 - ⟨g(x), g(y)⟩`` is a polynomial in the unit embeddings: its gradient is finite, and zero,
at ``x = y``.

Images are (N, 3, H, W) tensors in [0, 1] (``normalize=True``, lipsim's convention and the
default) or in [-1, 1] (``normalize=False``, LPIPS's default); any size, resized differentiably
(:func:`lipsim.preprocess`, shorter side then centre crop) when it is not the model's 224×224.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("lipsim.metrics needs torchmetrics: pip install 'lipsim[torchmetrics]'") from exc

from .images import RESIZE_MODES, preprocess
from .model import LipSim

__all__ = ["LipSimDistance", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


class LipSimDistance(Metric):
    """The LipSim distance ``1 - ⟨g(x), g(y)⟩`` (0 = identical, at most 2) as a torchmetrics metric.

    Args:
        model: a :class:`lipsim.LipSim`, or anything :func:`lipsim.load` takes (a file, a published
            name such as ``"lipsim-margin-0.5"``); None: the packaged default model.
        reduction: "mean" (default) or "sum" over every pair seen, or "none": the (N,) distances.
        normalize: True (default): images in [0, 1]; False: images in [-1, 1], as LPIPS takes them.
        resize: how images of another size are brought to the model's input, "crop" or "squash".
        kwargs: torchmetrics' Metric options (``sync_on_compute``, ...).
    """

    is_differentiable: bool = True
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 2.0

    def __init__(
        self,
        model: LipSim | str | None = None,
        reduction: str = "mean",
        normalize: bool = True,
        resize: str = "crop",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if not isinstance(model, LipSim):
            from .checkpoints import load

            model = load(model)
        self.model = model.eval().requires_grad_(False)
        self.reduction = reduction
        self.normalize = normalize
        self.resize = resize
        if reduction == "none":
            self.add_state("scores", default=[], dist_reduce_fx="cat")
        else:
            self.add_state(
                "total_distance", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> LipSimDistance:
        """The metric's own flag follows ``mode``; the network stays in eval mode (it is a fixed
        loss, never trained through this wrapper)."""
        super().train(mode)
        self.model.eval()
        return self

    def _prepare(self, images: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(
                f"{name}: expected an (N, 3, H, W) tensor, got {getattr(images, 'shape', images)!r}"
            )
        if not self.normalize:
            images = (images + 1.0) / 2.0
        try:
            return preprocess(images, size=self.model.input_size, resize=self.resize)
        except ValueError:
            # preprocess refuses values outside [0, 1]; images in [-1, 1] most likely mean LPIPS's
            # convention, so say how to pass them (checked only on this error path)
            if self.normalize and images.is_floating_point() and float(images.min()) >= -1:
                raise ValueError(
                    f"{name}: values below 0 (smallest {float(images.min()):.3g}): LipSimDistance takes "
                    "images in [0, 1]; pass normalize=False for images in [-1, 1] (LPIPS's convention)"
                ) from None
            raise

    def _distances(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        x, y = self._prepare(img1, "img1"), self._prepare(img2, "img2")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"img1 and img2 hold {x.shape[0]} and {y.shape[0]} images")
        return self.model(x, y)

    def update(self, img1: torch.Tensor, img2: torch.Tensor, _distances: torch.Tensor | None = None) -> None:
        """Adds the distances of a batch of pairs to the state (detached: the state never keeps a
        computation graph alive across training steps)."""
        d = (self._distances(img1, img2) if _distances is None else _distances).detach()
        if self.reduction == "none":
            self.scores.append(d)
        else:
            self.total_distance = self.total_distance + d.sum().to(self.total_distance.dtype)
            self.count = self.count + d.numel()

    def _reduce(self, d: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return d
        return d.mean() if self.reduction == "mean" else d.sum()

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        """The batch's reduced distance, differentiable in both images (a training loss); the
        batch is also added to the state, as ``update`` would."""
        d = self._distances(img1, img2)
        self.update(img1, img2, _distances=d)
        self._forward_cache = self._reduce(d)
        return self._forward_cache

    def compute(self) -> torch.Tensor:
        """The mean or sum of every distance seen (float32), or all of them (N,) for "none"."""
        if self.reduction == "none":
            return dim_zero_cat(self.scores)
        total = self.total_distance.float()
        return total / self.count.clamp_min(1) if self.reduction == "mean" else total
