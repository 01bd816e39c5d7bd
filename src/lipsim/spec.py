"""Architectures as data: :class:`ArchConfig`, the registry, and each architecture's layer plan.

Nothing here imports torch. The torch modules (:mod:`lipsim.archs`) and the NumPy inference
engine (:mod:`lipsim.numpy_engine`) are both built from :func:`layer_plan`, so the two cannot
disagree on the order of layers, their sizes or their parameter names; :func:`expected_state`
gives the state-dict keys and shapes a checkpoint of an architecture must hold.

Two families:

* ``published``: the LipSim architectures small/medium/large/xlarge exactly as in the paper's
  code (docs/method.md §2.5): zero channel padding, ``depth`` SLL convolutions at full
  resolution, two 4×4 sum/4 pools (224 -> 14), flatten, ``depth_linear`` SLL linear layers,
  truncation to ``out_dim``. Group names (``convs``, ``linear``) match the published state dict.
* ``s2d``: our faster family. An exact space-to-depth rearrangement replaces zero channel
  padding at full resolution (3×224×224 -> 48×56×56 with r = 4, an isometry), then stages of SLL
  convolutions separated by further 2×2 space-to-depth steps, a sum/k pool, flatten, optional
  zero-padding or truncation to the linear width, SLL linear layers and truncation.
"""

from __future__ import annotations

import dataclasses
import json

__all__ = [
    "ArchConfig",
    "LayerSpec",
    "FAMILIES",
    "HEADS",
    "SLL_KERNEL_SIZE",
    "register",
    "get_config",
    "list_archs",
    "layer_plan",
    "expected_state",
    "EMBEDDINGS",
]

FAMILIES = ("published", "s2d")
#: how an embedding is normalised: "append" ([f; 1], our models) or "plain" (published ones)
EMBEDDINGS = ("append", "plain")
#: spatial size of every SLL convolution kernel (the published code's choice)
SLL_KERNEL_SIZE = 3
#: s2d heads: "grid" (sum/k pool, flatten: the feature keeps a coarse spatial grid) or a global
#: 1-Lipschitz pooling over all positions (layer kind ``global_pool``, see lipsim.pooling.GlobalPool)
HEADS = ("grid", "sum", "norm", "sum_norm", "sum_std", "sum_std_grid")


_MAX_LAYERS = 10_000
_MAX_WIDTH = 1 << 24
_MAX_STAGES = 16
#: activation elements per image a configuration may need before any weight is involved (the
#: published family pads the input to ``channels``): 2^28 floats = 1 GiB
_MAX_ACTIVATION = 1 << 28
#: the input is in [0, 1]: a larger centre only throws float32 precision away
_MAX_CENTER = 16.0
#: (field, smallest, largest) for the integer fields of ArchConfig
_INT_BOUNDS = (
    ("out_dim", 1, _MAX_WIDTH),
    ("input_size", 1, 16_384),
    ("depth", 0, _MAX_LAYERS),
    ("channels", 0, _MAX_WIDTH),
    ("conv_size", 1, _MAX_WIDTH),
    ("s2d", 1, 64),
    ("pool", 1, 4096),
    ("linear_width", 0, _MAX_WIDTH),
    ("depth_linear", 0, _MAX_LAYERS),
    ("n_features", 1, _MAX_WIDTH),
)


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
    head: str = "grid"  # s2d family: one of HEADS ("grid" uses ``pool``; the global ones ignore it)
    # both
    depth_linear: int = 0
    n_features: int = 1024

    def __post_init__(self) -> None:
        """Refuses impossible or absurd values, so that a hostile model file cannot make the plan
        divide by zero or build billions of layers before its weights are even compared."""
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 200:
            raise ValueError("architecture name must be a non-empty string of at most 200 characters")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown architecture family {self.family!r}")
        for field, low, high in _INT_BOUNDS:
            value = getattr(self, field)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{field} must be an integer in [{low}, {high}], got {value!r}")
        if not isinstance(self.stages, tuple) or len(self.stages) > _MAX_STAGES:
            raise ValueError(f"stages must be a tuple of at most {_MAX_STAGES} (n_convs, inner) pairs")
        for stage in self.stages:
            if (
                not isinstance(stage, tuple)
                or len(stage) != 2
                or any(type(v) is not int for v in stage)
                or not 0 <= stage[0] <= _MAX_LAYERS
                or not 1 <= stage[1] <= _MAX_WIDTH
            ):
                raise ValueError(f"bad stage {stage!r}: expected (n_convs, inner width) integers")
        if type(self.center) not in (int, float) or not abs(self.center) <= _MAX_CENTER:
            raise ValueError(
                f"center must be a number in [-{_MAX_CENTER:g}, {_MAX_CENTER:g}], got {self.center!r}"
            )
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} (choose from {', '.join(HEADS)})")
        if self.head != "grid" and self.family != "s2d":
            raise ValueError("global pooling heads exist for the s2d family only")
        width = max(self.channels, 3) if self.family == "published" else 3
        if width * self.input_size**2 > _MAX_ACTIVATION:
            raise ValueError(
                f"{width} channels at {self.input_size}x{self.input_size} exceed {_MAX_ACTIVATION} "
                "activations per image"
            )

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if fields["head"] == "grid":  # the default: files written before heads existed stay identical
            del fields["head"]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArchConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("architecture metadata is not a JSON object")
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
        if self.head != "grid":
            return channels * {"sum_norm": 2, "sum_std": 2, "sum_std_grid": 6}.get(self.head, 1)
        side //= self.pool
        return channels * side * side

    def feature_width(self) -> int:
        return self.linear_width or self.flat_dim()


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One 1-Lipschitz layer: its kind and constructor arguments.

    Kinds and arguments: ``shift (value,)``, ``space_to_depth (r,)``, ``channel_pad (channels,)``,
    ``sll_conv (channels, inner)``, ``sum_pool (k,)``, ``flatten ()``, ``truncate (n,)``,
    ``zero_pad (n,)``, ``sll_linear (features, inner)``, ``global_pool (mode,)`` with mode one of
    ``sum``, ``norm``, ``sum_norm``, ``sum_std``, ``sum_std_grid`` ((B, C, H, W) -> (B, C), (B, 2C) or
    (B, 6C)).
    """

    kind: str
    args: tuple = ()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the layer's parameters (empty for parameter-free layers)."""
        if self.kind == "sll_conv":
            channels, inner = self.args
            k = SLL_KERNEL_SIZE
            return {"kernel": (inner, channels, k, k), "bias": (1, inner, 1, 1), "q": (inner,)}
        if self.kind == "sll_linear":
            features, inner = self.args
            return {"weight": (inner, features), "bias": (1, inner), "q": (inner,)}
        return {}


#: a plan: top-level names mapped to one layer or to a group (an indexed sequence of layers)
Plan = list[tuple[str, "LayerSpec | tuple[LayerSpec, ...]"]]


def _plan_published(c: ArchConfig) -> Plan:
    if c.input_size % 16:
        raise ValueError("published architectures need an input size divisible by 16")
    flat = c.flat_dim()
    convs = tuple(LayerSpec("sll_conv", (c.channels, c.conv_size)) for _ in range(c.depth))
    linear = tuple(LayerSpec("sll_linear", (flat, c.n_features)) for _ in range(c.depth_linear))
    return [
        ("pad", LayerSpec("channel_pad", (c.channels,))),
        ("convs", convs + (LayerSpec("sum_pool", (4,)), LayerSpec("sum_pool", (4,)))),
        ("linear", (LayerSpec("flatten"),) + linear),
        ("trunc", LayerSpec("truncate", (c.out_dim,))),
    ]


def _plan_s2d(c: ArchConfig) -> Plan:
    if not c.stages:
        raise ValueError("an s2d architecture needs at least one stage")
    div = c.s2d * 2 ** (len(c.stages) - 1) * (c.pool if c.head == "grid" else 1)
    if c.input_size % div:
        raise ValueError(f"input size {c.input_size} is not divisible by {div}")
    plan: Plan = []
    if c.center:
        plan.append(("center", LayerSpec("shift", (float(c.center),))))
    plan.append(("stem", LayerSpec("space_to_depth", (c.s2d,))))
    channels = 3 * c.s2d**2
    for i, (n_convs, inner) in enumerate(c.stages):
        block: list[LayerSpec] = []
        if i > 0:
            block.append(LayerSpec("space_to_depth", (2,)))
            channels *= 4
        block += [LayerSpec("sll_conv", (channels, inner)) for _ in range(n_convs)]
        plan.append((f"stage{i}", tuple(block)))
    head: list[LayerSpec] = []
    if c.head != "grid":
        head.append(LayerSpec("global_pool", (c.head,)))
    else:
        if c.pool > 1:
            head.append(LayerSpec("sum_pool", (c.pool,)))
        head.append(LayerSpec("flatten"))
    flat, width = c.flat_dim(), c.feature_width()
    if width > flat:
        head.append(LayerSpec("zero_pad", (width,)))
    elif width < flat:
        head.append(LayerSpec("truncate", (width,)))
    head += [LayerSpec("sll_linear", (width, c.n_features)) for _ in range(c.depth_linear)]
    plan.append(("head", tuple(head)))
    if c.out_dim > width:
        raise ValueError(f"out_dim {c.out_dim} exceeds the feature width {width}")
    plan.append(("trunc", LayerSpec("truncate", (c.out_dim,))))
    return plan


_PLANNERS = {"published": _plan_published, "s2d": _plan_s2d}
_REGISTRY: dict[str, ArchConfig] = {}


def layer_plan(config: ArchConfig | str) -> Plan:
    """The architecture as ``[(name, LayerSpec or tuple of LayerSpecs), ...]`` in order."""
    if isinstance(config, str):
        config = get_config(config)
    if config.family not in _PLANNERS:
        raise ValueError(f"unknown architecture family {config.family!r}")
    return _PLANNERS[config.family](config)


def flat_layers(plan: Plan) -> list[tuple[str, LayerSpec]]:
    """``(state-dict prefix, spec)`` for every layer, in the order they are applied."""
    out = []
    for name, entry in plan:
        if isinstance(entry, LayerSpec):
            out.append((name, entry))
        else:
            out += [(f"{name}.{j}", spec) for j, spec in enumerate(entry)]
    return out


def expected_state(config: ArchConfig | str) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the architecture's parameters."""
    return {
        f"{prefix}.{pname}": shape
        for prefix, spec in flat_layers(layer_plan(config))
        for pname, shape in spec.param_shapes().items()
    }


def register(config: ArchConfig) -> ArchConfig:
    """Adds an architecture to the registry (name must be new)."""
    if config.family not in FAMILIES:
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


# The published LipSim architectures (docs/method.md §2.5), teacher dimension 1792.
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
# s2d-lite's trunk behind a global 1-Lipschitz pooling head: [Σ_p h/√n ; ‖h_c - mean‖] per channel,
# 384 features, nothing after it (the hinge-only end of the v2 trade-off in the model card)
_S2D_LITE_POOL = register(
    ArchConfig(
        "s2d-lite-pool",
        "s2d",
        out_dim=384,
        s2d=4,
        stages=((3, 16), (4, 32)),
        pool=1,
        head="sum_std",
        linear_width=0,
        depth_linear=0,
        n_features=512,
        center=0.5,
    )
)
# the same behind two SLL linear layers, zero-padded to the offline teacher's 2712 (distillation;
# the packaged default model since v2)
register(
    dataclasses.replace(
        _S2D_LITE_POOL, name="s2d-lite-pool-distill", out_dim=2712, linear_width=2712, depth_linear=2
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
register(
    ArchConfig(
        "tiny-s2d-pool",
        "s2d",
        out_dim=40,
        s2d=4,
        stages=((2, 4), (1, 8)),
        pool=1,
        head="sum_std",
        linear_width=400,
        depth_linear=1,
        n_features=16,
        center=0.5,
    )
)
