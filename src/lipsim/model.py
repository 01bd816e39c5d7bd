"""LipSim: a 1-Lipschitz backbone, a normalised embedding, a distance and its certificates.

``g(x) = z(x)/‖z(x)‖`` with ``z = [f(x); 1]`` ("append", our models: g is 1-Lipschitz by
construction) or ``z = f(x)`` ("plain", how the published checkpoints were trained and
evaluated: g is *not* 1-Lipschitz in general, so their certificates use the norm-aware radius
of :func:`lipsim.certify.radius_2afc_plain`). ``d(x, y) = 1 - ⟨g(x), g(y)⟩``.

Everything returned here is computed in float32 with TF32 and autocast disabled
(:func:`lipsim.precision.exact_float32`), whatever the caller's global settings; certificates are
then finished in float64 by :mod:`lipsim.certify` (shared with the torch-free
:mod:`lipsim.numpy_engine`).

Gradient-free calls run the frozen engine (:mod:`lipsim.engine`): :meth:`LipSim.freeze` folds the
weights once and returns a LipSim around that engine, for many calls on fixed weights; a model
that is not frozen folds its current weights on each such call (never stale). When gradients can
flow to the parameters (training), the forward runs the layers themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from . import certify
from .archs import ArchConfig, LipschitzBackbone, build_backbone
from .batching import in_batches
from .embedding import normalise
from .engine import FrozenBackbone, fold
from .errors import LipSimError
from .images import check_images
from .modelfiles import model_metadata, write_safetensors
from .precision import exact_float32, reduced
from .spec import EMBEDDINGS

__all__ = ["LipSim", "EMBEDDINGS", "exact_float32"]


def _batch(x, name: str) -> int:
    """Batch size of an image batch argument (its full check happens before the forward)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be an image batch tensor (B, 3, H, W), got {_describe(x)}")
    return x.shape[0]


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class LipSim(nn.Module):
    """The perceptual metric. ``model(x, y)`` is the distance; see docs/api.md for the contract.

    Images are (B, 3, S, S) float tensors in [0, 1] with S = ``model.input_size`` (224 for all
    registered architectures); anything else raises ``ValueError``.
    """

    def __init__(self, backbone: LipschitzBackbone | FrozenBackbone, embedding: str = "append"):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if not isinstance(backbone, (LipschitzBackbone, FrozenBackbone)):
            raise TypeError(f"expected a LipschitzBackbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.embedding = embedding

    # -- description ----------------------------------------------------------------------------
    @property
    def config(self) -> ArchConfig:
        return self.backbone.config

    @property
    def arch(self) -> str:
        return self.backbone.config.name

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def embed_dim(self) -> int:
        return self.config.out_dim + (1 if self.embedding == "append" else 0)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")  # a parameter-free architecture (pads, pools and reshapes only)

    @property
    def frozen(self) -> bool:
        """Whether this model runs a frozen engine (:meth:`freeze`): fixed weights, no parameters."""
        return isinstance(self.backbone, FrozenBackbone)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, embedding={self.embedding!r}"

    def freeze(self) -> LipSim:
        """A LipSim with the same API around this model's weights folded once (:func:`lipsim.engine.fold`):
        for many gradient-free calls (retrieval, evaluation, serving). A snapshot: it has no
        parameters, training never sees it, and after the weights change call ``freeze()`` again."""
        if self.frozen:
            return self
        frozen = LipSim(fold(self.backbone), self.embedding)
        for key, value in vars(self).items():  # plain notes callers attached (``untrained``, ...)
            if not key.startswith("_") and key not in vars(frozen):
                setattr(frozen, key, value)
        return frozen.train(self.training)

    def _runner(self) -> nn.Module:
        """What computes f: the layers while gradients can flow to the parameters (training), the
        frozen engine otherwise (folded now, from the current weights, unless already frozen)."""
        if self.frozen:
            return self.backbone
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone
        return fold(self.backbone)

    # -- the function ---------------------------------------------------------------------------
    def _features_of(self, *named: tuple[torch.Tensor, str]) -> torch.Tensor:
        """Validates each (images, name) once, then runs the backbone once on their concatenation."""
        for x, name in named:
            check_images(x, name, size=self.input_size)
        x = torch.cat([x.to(device=self.device, dtype=torch.float32) for x, _ in named])
        with exact_float32(x.device.type):
            f = self._runner()(x).float()
        if not bool(torch.isfinite(f).all()):
            raise LipSimError(
                "the model produced non-finite features (NaN or inf): its weights overflow float32"
            )
        return f

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone output f(x), (B, k), float32; 1-Lipschitz in x."""
        return self._features_of((x, "images"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings g(x), (B, D); differentiable in x."""
        return normalise(self.features(x), self.embedding)

    def _embed_many(self, *xs: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        g = normalise(self._features_of(*zip(xs, names, strict=True)), self.embedding)
        return list(torch.split(g, [x.shape[0] for x in xs]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance ``1 - ⟨g(x), g(y)⟩`` in [0, 2], shape (B,); a batch of 1 broadcasts."""
        gx, gy = self._embed_many(x, y, names=("x", "y"))
        if gx.shape[0] != gy.shape[0] and 1 not in (gx.shape[0], gy.shape[0]):
            raise ValueError(f"batch sizes {gx.shape[0]} and {gy.shape[0]} do not match")
        return (1.0 - (gx * gy).sum(dim=1)).clamp(0.0, 2.0)  # rounding can leave [0, 2] by an ulp

    distance = forward

    # -- certificates ---------------------------------------------------------------------------
    @torch.no_grad()
    def certify_2afc(self, ref: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> certify.Certificate2AFC:
        """Which of x0, x1 is closer to ref, and the ℓ2 radius around ref within which that holds.

        x0 and x1 hold the same number N of images; ref holds N or 1 (one reference against N
        pairs of candidates: it is embedded once)."""
        n_ref = certify.check_2afc_batches(_batch(ref, "ref"), _batch(x0, "x0"), _batch(x1, "x1"))
        f = self._features_of((ref, "ref"), (x0, "x0"), (x1, "x1"))
        f_ref, f0, f1 = torch.split(f, [n_ref, x0.shape[0], x1.shape[0]])
        return certify.certificate_from_features(f_ref.expand_as(f0), f0, f1, self.embedding)

    @torch.no_grad()
    def distance_with_interval(
        self, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(d, lo, hi)``: the distance d(x, y) and bounds ``lo ≤ d(x + δ, y) ≤ hi`` for every
        ‖δ‖₂ ≤ eps (δ on x only), from one forward pass."""
        eps = certify.check_eps(eps)
        if _batch(x, "x") != _batch(y, "y"):
            raise ValueError(f"batch sizes {x.shape[0]} and {y.shape[0]} do not match")
        f = self._features_of((x, "x"), (y, "y"))
        return certify.interval_from_features(*torch.chunk(f, 2), eps, self.embedding)

    def distance_interval(
        self, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds ``lo ≤ d(x + δ, y) ≤ hi`` for every ‖δ‖₂ ≤ eps (δ on x only)."""
        return self.distance_with_interval(x, y, eps)[1:]

    @torch.no_grad()
    def pairwise(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        eps: float | None = None,
        batch_size: int = 64,
        progress: bool | None = False,
    ):
        """All distances ``D[i, j] = d(x_i, y_j)``: a float32 (N, M) tensor; ``y=None`` compares
        ``x`` with itself. Each image is embedded once (in batches of ``batch_size``; ``progress``
        shows a bar, None: only on a terminal for long runs), so this costs N + M forward passes,
        not N·M. With ``eps``, returns ``(D, lo, hi)`` where ``lo ≤ d(x_i + δ, y_j) ≤ hi`` for
        every ‖δ‖₂ ≤ eps (δ on the row image), the interval of :meth:`distance_with_interval`.
        Computed in float64 from the float32 features, without gradients (use ``model(x, y)``).

        ``x`` (and ``y``) may also be cached embeddings (N, ``embed_dim``) from :meth:`embed`: then
        nothing is run (1,000 × 1,000 in a fraction of a second); intervals need an append-mode model.
        """
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return certify.pairwise_from_cached(x, y, self.embed_dim, self.embedding, eps)
        sides = [(x, "x")] if y is None else [(x, "x"), (y, "y")]
        for images, name in sides:
            if _batch(images, name) == 0:
                raise ValueError(f"{name}: empty batch")
        model = self.freeze()  # folded once for all batches
        fx = in_batches(model.features, x, batch_size, torch.cat, progress)
        fy = fx if y is None else in_batches(model.features, y, batch_size, torch.cat, progress)
        return certify.pairwise_from_features(fx, fy, self.embedding, eps)

    # -- reduced precision (never certified) ----------------------------------------------------
    @torch.no_grad()
    def embed_fast(self, x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Embeddings in reduced precision for ranking and retrieval. NOT certified."""
        check_images(x, "images", size=self.input_size)
        x = x.to(self.device)
        with reduced(x.device.type, dtype):
            f = self.freeze().backbone(x.to(dtype))
        return normalise(f.float(), self.embedding)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path, extra_metadata: dict | None = None) -> None:
        """Writes weights and configuration into one safetensors file (atomically), the format of
        :mod:`lipsim.modelfiles`; ``lipsim.save(model, path)`` is the same call. ``extra_metadata``
        adds text entries to the header (a trainer's teacher, data, ...)."""
        if self.frozen:
            raise TypeError("a frozen engine holds folded weights only: save the model it was frozen from")
        state = self.backbone.state_dict()
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        write_safetensors(path, tensors, model_metadata(self.config, self.embedding, extra_metadata))

    @classmethod
    def from_config(cls, config: ArchConfig | str, embedding: str = "append") -> LipSim:
        return cls(build_backbone(config), embedding=embedding)
