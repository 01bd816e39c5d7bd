"""Named 1-Lipschitz backbones f: [0,1]^{3×S×S} -> R^k, in a registry.

Two families share one module type, :class:`LipschitzBackbone` (an ``nn.Sequential`` whose every
child is a 1-Lipschitz layer from :mod:`lipsim.layers`):

* ``published``: the LipSim architectures small/medium/large/xlarge exactly as in the paper's
  code (lipsim-method.md §2.1): zero channel padding, ``depth`` SLL convolutions at full
  resolution, two 4×4 sum/4 pools (224 -> 14), flatten, ``depth_linear`` SLL linear layers,
  truncation to ``out_dim``. Child names (``convs``, ``linear``) match the published state dict.
* ``s2d``: our faster family. An exact space-to-depth rearrangement replaces zero channel
  padding at full resolution (3×224×224 -> 48×56×56 with r = 4, an isometry), then stages of SLL
  convolutions separated by further 2×2 space-to-depth steps, a sum/k pool, flatten, optional
  zero-padding or truncation to the linear width, SLL linear layers and truncation.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from .layers import (
    Flatten,
    LipschitzModule,
    Shift,
    SLLConv2d,
    SLLLinear,
    SpaceToDepth,
    SumPool,
    Truncate,
    ZeroChannelPad,
    ZeroPadFeatures,
)

__all__ = ["ArchConfig", "LipschitzBackbone", "register", "get_config", "list_archs", "build_backbone"]


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a backbone; stored in checkpoint metadata as JSON."""

    name: str
    family: str  # "published" | "s2d"
    out_dim: int = 1792
    input_size: int = 224
    # published family
    depth: int = 0
    channels: int = 0
    conv_size: int = 5
    # s2d family: space-to-depth factor of the stem, then stages of (n_convs, inner width)
    s2d: int = 4
    stages: tuple[tuple[int, int], ...] = ()
    pool: int = 4
    linear_width: int = 0  # 0: the flattened size
    center: float = 0.0  # s2d family: subtract this constant first (an isometry)
    # both
    depth_linear: int = 0
    n_features: int = 1024

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArchConfig:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        raw["stages"] = tuple(tuple(s) for s in raw.get("stages", ()))
        return cls(**raw)

    # -- derived sizes -------------------------------------------------------------------------
    def flat_dim(self) -> int:
        if self.family == "published":
            side = self.input_size // 16
            return self.channels * side * side
        channels = 3 * self.s2d**2
        side = self.input_size // self.s2d
        for i, _ in enumerate(self.stages):
            if i > 0:
                channels, side = channels * 4, side // 2
        side //= self.pool
        return channels * side * side

    def feature_width(self) -> int:
        return self.linear_width or self.flat_dim()


class LipschitzBackbone(nn.Sequential):
    """A composition of 1-Lipschitz layers; hence 1-Lipschitz in ℓ2 on [0,1] pixels.

    ``config`` is the :class:`ArchConfig` it was built from.
    """

    def __init__(self, config: ArchConfig, layers: OrderedDict):
        super().__init__(layers)
        self.config = config

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def lipschitz_layers(self) -> list[tuple[str, nn.Module]]:
        """Leaf layers in the order they are applied (nested Sequentials flattened)."""
        out: list[tuple[str, nn.Module]] = []

        def walk(prefix: str, module: nn.Module) -> None:
            if isinstance(module, LipschitzModule) or not isinstance(module, nn.Sequential):
                out.append((prefix, module))
                return
            for name, child in module.named_children():
                walk(f"{prefix}.{name}" if prefix else name, child)

        walk("", self)
        return out


def _build_published(c: ArchConfig) -> LipschitzBackbone:
    if c.input_size % 16:
        raise ValueError("published architectures need an input size divisible by 16")
    flat = c.flat_dim()
    convs = [SLLConv2d(c.channels, c.conv_size) for _ in range(c.depth)] + [SumPool(4), SumPool(4)]
    linear = [Flatten()] + [SLLLinear(flat, c.n_features) for _ in range(c.depth_linear)]
    return LipschitzBackbone(
        c,
        OrderedDict(
            pad=ZeroChannelPad(c.channels),
            convs=nn.Sequential(*convs),
            linear=nn.Sequential(*linear),
            trunc=Truncate(c.out_dim),
        ),
    )


def _build_s2d(c: ArchConfig) -> LipschitzBackbone:
    if not c.stages:
        raise ValueError("an s2d architecture needs at least one stage")
    div = c.s2d * 2 ** (len(c.stages) - 1) * c.pool
    if c.input_size % div:
        raise ValueError(f"input size {c.input_size} is not divisible by {div}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if c.center:
        layers["center"] = Shift(c.center)
    layers["stem"] = SpaceToDepth(c.s2d)
    channels = 3 * c.s2d**2
    for i, (n_convs, inner) in enumerate(c.stages):
        block: list[nn.Module] = []
        if i > 0:
            block.append(SpaceToDepth(2))
            channels *= 4
        block += [SLLConv2d(channels, inner) for _ in range(n_convs)]
        layers[f"stage{i}"] = nn.Sequential(*block)
    head: list[nn.Module] = []
    if c.pool > 1:
        head.append(SumPool(c.pool))
    head.append(Flatten())
    flat, width = c.flat_dim(), c.feature_width()
    if width > flat:
        head.append(ZeroPadFeatures(width))
    elif width < flat:
        head.append(Truncate(width))
    head += [SLLLinear(width, c.n_features) for _ in range(c.depth_linear)]
    layers["head"] = nn.Sequential(*head)
    if c.out_dim > width:
        raise ValueError(f"out_dim {c.out_dim} exceeds the feature width {width}")
    layers["trunc"] = Truncate(c.out_dim)
    return LipschitzBackbone(c, layers)


_BUILDERS: dict[str, Callable[[ArchConfig], LipschitzBackbone]] = {
    "published": _build_published,
    "s2d": _build_s2d,
}
_REGISTRY: dict[str, ArchConfig] = {}


def register(config: ArchConfig) -> ArchConfig:
    """Adds an architecture to the registry (name must be new)."""
    if config.family not in _BUILDERS:
        raise ValueError(f"unknown architecture family {config.family!r}")
    if config.name in _REGISTRY and _REGISTRY[config.name] != config:
        raise ValueError(f"architecture {config.name!r} is already registered differently")
    _REGISTRY[config.name] = config
    return config


def get_config(name: str) -> ArchConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_archs())}") from None


def list_archs() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(config: ArchConfig | str) -> LipschitzBackbone:
    if isinstance(config, str):
        config = get_config(config)
    return _BUILDERS[config.family](config)


# The published LipSim architectures (lipsim-method.md §2.1), teacher dimension 1792.
register(ArchConfig("small", "published", depth=20, channels=45, depth_linear=7, n_features=1024))
register(ArchConfig("medium", "published", depth=30, channels=60, depth_linear=10, n_features=2048))
register(ArchConfig("large", "published", depth=50, channels=90, depth_linear=10, n_features=2048))
register(ArchConfig("xlarge", "published", depth=70, channels=120, depth_linear=15, n_features=2048))

# Our space-to-depth family (issue: the default model and the speed work).
register(
    ArchConfig(
        "s2d-small",
        "s2d",
        out_dim=1792,
        s2d=4,
        stages=((20, 16),),
        pool=4,
        linear_width=0,
        depth_linear=0,
        n_features=1024,
    )
)
register(
    ArchConfig(
        "s2d-compact",
        "s2d",
        out_dim=1024,
        s2d=4,
        stages=((6, 16), (6, 32)),
        pool=7,
        depth_linear=2,
        n_features=1024,
    )
)
register(
    ArchConfig(
        "s2d-lite",
        "s2d",
        out_dim=1024,
        s2d=4,
        stages=((3, 16), (4, 32)),
        pool=7,
        depth_linear=2,
        n_features=512,
        center=0.5,
    )
)

# Tiny architectures for tests and smoke runs (same layer types, a few thousand parameters).
register(
    ArchConfig(
        "tiny", "published", out_dim=64, depth=2, channels=6, conv_size=2, depth_linear=1, n_features=32
    )
)
register(
    ArchConfig(
        "tiny-s2d", "s2d", out_dim=64, s2d=4, stages=((2, 4), (1, 8)), pool=7, depth_linear=1, n_features=32
    )
)
