"""Perceptual metrics behind one small interface, so evaluation and attacks treat them alike.

A :class:`Metric` has a ``name``, a differentiable ``distance(x, y) -> (B,)`` on images in
**[0, 1]** (each adapter converts to its network's own convention, e.g. LPIPS' [-1, 1]), an
optional ``embed(x) -> (B, D)`` (unit-norm rows with ``distance = 1 - ⟨e(x), e(y)⟩``; attacks
then embed the fixed images once) and ``certify_2afc`` (``None`` for metrics without
certificates). :func:`get_metric` builds one from a short spec:

=====================  =============================================================================
``lipsim``             the LipSim model given as ``model_source`` (a path, ``arch:NAME``, or a model)
``lipsim:SOURCE``      a LipSim model from SOURCE (same forms)
``teacher:NAME``       1 - cos of the embeddings of ``lipsim.teachers.get_teacher(NAME)``
``l2``                 pixel ℓ2 norm ``‖x - y‖₂`` over the whole (3, H, W) image
``ssim``               1 - SSIM, a differentiable torch SSIM equal to scikit-image's
                       ``structural_similarity(gaussian_weights=True, sigma=1.5,
                       use_sample_covariance=False, data_range=1, channel_axis=0)``
``lpips[:NET]``        LPIPS (pip ``lpips``), NET = alex (default) | vgg | squeeze
``dreamsim[:TYPE]``    DreamSim (pip ``dreamsim``; weights in ``$LIPSIM_DREAMSIM_CACHE`` or
                       ``~/.cache/lipsim/dreamsim``), via ``lipsim.teachers``; TYPE = ensemble | ...
=====================  =============================================================================

LPIPS and DreamSim are only built from files already on disk: the machine may be offline, so a
missing package or weight file raises :class:`MetricUnavailable` with one line naming it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LipSimError, one_line
from ..images import check_images

__all__ = [
    "Metric",
    "LipSimMetric",
    "EmbeddingMetric",
    "PixelL2Metric",
    "SSIMMetric",
    "LPIPSMetric",
    "MetricUnavailable",
    "get_metric",
    "ssim",
    "METRIC_SPECS",
]

METRIC_SPECS = ("lipsim", "lipsim:SOURCE", "teacher:NAME", "l2", "ssim", "lpips[:NET]", "dreamsim[:TYPE]")
#: torchvision backbone files LPIPS loads (from torch.hub's checkpoint folder)
_LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class MetricUnavailable(LipSimError, ValueError):
    """A metric whose package, weights or model cannot be found (one-line message)."""


class Metric:
    """A perceptual distance on (B, 3, H, W) images in [0, 1].

    Subclasses implement :meth:`distance`; embedding metrics also :meth:`embed` and set
    ``has_embedding``; certified metrics set ``certify_2afc``.
    """

    name: str = "metric"
    #: square side the metric requires (None: any size)
    input_size: int | None = None
    has_embedding: bool = False
    #: ``certify_2afc(ref, x0, x1) -> lipsim.Certificate2AFC`` or None
    certify_2afc = None

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    @property
    def certified(self) -> bool:
        return self.certify_2afc is not None

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"metric {self.name!r} has no embedding")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(x, y)

    def describe(self) -> dict:
        return {"metric": self.name, "has_certificates": self.certified}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    for t, n in ((x, "x"), (y, "y")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{n}: expected a (B, 3, H, W) tensor")
    if x.shape[2:] != y.shape[2:]:
        raise ValueError(f"x and y differ in size: {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}")
    if x.shape[0] != y.shape[0] and 1 not in (x.shape[0], y.shape[0]):
        raise ValueError(f"batch sizes {x.shape[0]} and {y.shape[0]} do not match")


class LipSimMetric(Metric):
    """A :class:`lipsim.LipSim` model: distance ``1 - ⟨g(x), g(y)⟩``, embedding g, certificates."""

    has_embedding = True

    def __init__(self, model, name: str = "lipsim"):
        super().__init__(model.device)
        self.model = model.freeze()  # evaluation: the weights folded once (lipsim.engine)
        self.name = name
        self.input_size = model.input_size
        self.certify_2afc = self.model.certify_2afc

    def distance(self, x, y):
        return self.model(x.to(self.device), y.to(self.device))

    def embed(self, x):
        return self.model.embed(x.to(self.device))

    def describe(self) -> dict:
        return {
            "metric": self.name,
            "has_certificates": True,
            "arch": self.model.arch,
            "embedding": self.model.embedding,
            "untrained": bool(getattr(self.model, "untrained", False)),
        }


class EmbeddingMetric(Metric):
    """``1 - cos(e(x), e(y))`` for a network ``e`` taking [0, 1] images (teachers, DreamSim).

    ``lipsim.teachers`` networks run their ``forward`` without autograd (they are distillation
    targets); attacks need input gradients, so their ``embed_checked`` (the same computation
    without the ``no_grad`` wrapper) is used after checking the input here.
    """

    has_embedding = True

    def __init__(self, network, name: str, device="cpu", input_size: int | None = 224):
        super().__init__(device)
        self.network = network
        self.name = name
        self.input_size = input_size
        self._raw = getattr(network, "embed_checked", None) or network

    def embed(self, x):
        check_images(x, "images")
        e = self._raw(x.to(self.device)).float().reshape(x.shape[0], -1)
        return e / torch.linalg.vector_norm(e, dim=1, keepdim=True).clamp_min(1e-12)

    def distance(self, x, y):
        _check_pair(x, y)
        return 1.0 - (self.embed(x) * self.embed(y)).sum(dim=1)


class PixelL2Metric(Metric):
    """``‖x - y‖₂`` over all pixels and channels of [0, 1] images (no certificate needed: it is its own)."""

    name = "l2"

    def distance(self, x, y):
        _check_pair(x, y)
        diff = (x.to(self.device) - y.to(self.device)).flatten(1)
        return torch.linalg.vector_norm(diff, dim=1)


def _gaussian_window(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image, (B,), differentiable.

    Gaussian-weighted local statistics (σ = 1.5, window truncated at 3.5σ → 11 taps), K1 = 0.01,
    K2 = 0.03, population (not sample) covariances, averaged over channels and over the pixels
    whose window lies inside the image: exactly scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0`` (its
    reflect-padded border is cropped away before averaging, which a valid convolution reproduces).
    """
    _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        x, y = torch.broadcast_tensors(x, y)
    channels = x.shape[1]
    w = _gaussian_window(sigma, 3.5, x.dtype, x.device)
    taps = w.numel()
    if min(x.shape[2:]) < taps:
        raise ValueError(f"ssim needs images of at least {taps}x{taps} pixels")
    horizontal = w.view(1, 1, 1, taps).expand(channels, 1, 1, taps)
    vertical = w.view(1, 1, taps, 1).expand(channels, 1, taps, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, horizontal, groups=channels), vertical, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


class SSIMMetric(Metric):
    """``1 - SSIM`` (see :func:`ssim`); differentiable, so it can be attacked."""

    name = "ssim"

    def distance(self, x, y):
        return 1.0 - ssim(x.to(self.device), y.to(self.device))


class LPIPSMetric(Metric):
    """LPIPS (``lpips.LPIPS``) fed [0, 1] images with ``normalize=True`` (it wants [-1, 1] otherwise)."""

    def __init__(self, net: str = "alex", device="cpu"):
        super().__init__(device)
        if net not in _LPIPS_BACKBONES:
            raise MetricUnavailable(f"lpips: unknown network {net!r} (choose alex, vgg or squeeze)")
        if importlib.util.find_spec("lpips") is None:
            raise MetricUnavailable(
                "metric 'lpips' needs the Python package 'lpips' (pip install lpips), which is not installed"
            )
        weights = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONES[net]
        if not weights.is_file():
            raise MetricUnavailable(
                f"metric 'lpips:{net}' needs torchvision's {net} weights {weights.name} in "
                f"{weights.parent} (set TORCH_HOME to move it); they cannot be downloaded offline"
            )
        import lpips

        self.network = lpips.LPIPS(net=net, pretrained=True, verbose=False).to(self.device).eval()
        self.network.requires_grad_(False)
        self.name = f"lpips:{net}"

    def distance(self, x, y):
        _check_pair(x, y)
        return self.network(x.to(self.device), y.to(self.device), normalize=True).reshape(-1)


def _teacher_metric(name: str, label: str, device) -> EmbeddingMetric:
    try:
        from lipsim.teachers import get_teacher
    except ImportError:
        raise MetricUnavailable(
            f"metric {label!r} needs the lipsim.teachers package, which is not available"
        ) from None
    try:
        network = get_teacher(name, device=device)
    except ImportError as exc:  # e.g. the dreamsim package is not installed
        raise MetricUnavailable(f"metric {label!r}: {one_line(exc, limit=10_000)}") from None
    except FileNotFoundError as exc:  # weights not on disk (nothing is downloaded)
        raise MetricUnavailable(f"metric {label!r}: {one_line(exc, limit=10_000)}") from None
    network.eval().requires_grad_(False)
    return EmbeddingMetric(network, name=label, device=device)


def _load_lipsim(source, device):
    import lipsim

    if isinstance(source, lipsim.LipSim):
        return source
    if isinstance(source, str) and source.startswith("arch:"):
        model = lipsim.create_model(source[5:], seed=0, device=device).requires_grad_(False)
        model.untrained = True
        return model
    if source in (None, "", "default"):
        return lipsim.load(device=device)
    return lipsim.load(source, device=device)


def get_metric(spec: str, model_source=None, device="cpu") -> Metric:
    """Builds a metric from a spec (see the module docstring); ``model_source`` serves ``lipsim``."""
    spec = (spec or "lipsim").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "lipsim":
        model = _load_lipsim(arg if arg else model_source, device)
        return LipSimMetric(model, name="lipsim" if not arg else spec)
    if kind == "teacher":
        if not arg:
            raise MetricUnavailable("teacher metric needs a name: teacher:NAME (e.g. teacher:mobilenet_v2)")
        return _teacher_metric(arg, f"teacher:{arg}", device)
    if kind == "l2" and not arg:
        return PixelL2Metric(device)
    if kind == "ssim" and not arg:
        return SSIMMetric(device)
    if kind == "lpips":
        return LPIPSMetric(arg or "alex", device=device)
    if kind == "dreamsim":
        if importlib.util.find_spec("dreamsim") is None:
            raise MetricUnavailable(
                "metric 'dreamsim' needs the Python package 'dreamsim' (pip install dreamsim), "
                "which is not installed"
            )
        return _teacher_metric(f"dreamsim:{arg or 'ensemble'}", f"dreamsim:{arg or 'ensemble'}", device)
    raise MetricUnavailable(f"unknown metric {spec!r} (choose from {', '.join(METRIC_SPECS)})")
