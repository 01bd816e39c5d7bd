"""Torch modules for the architectures of :mod:`lipsim.spec`: a registry of named 1-Lipschitz
backbones f: [0,1]^{3×S×S} -> R^k.

Every architecture is described once, as data, by :func:`lipsim.spec.layer_plan`;
:func:`build_backbone` turns that plan into a :class:`LipschitzBackbone` (an ``nn.Sequential``
whose every child is a 1-Lipschitz layer from :mod:`lipsim.layers`). The registry functions and
:class:`ArchConfig` live in :mod:`lipsim.spec` (no torch) and are re-exported here.
"""

from __future__ import annotations

from collections import OrderedDict

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
from .pooling import GlobalPool
from .spec import ArchConfig, LayerSpec, get_config, layer_plan, list_archs, register

__all__ = ["ArchConfig", "LipschitzBackbone", "register", "get_config", "list_archs", "build_backbone"]

#: the torch module of each layer kind of :class:`lipsim.spec.LayerSpec`
LAYER_TYPES: dict[str, type[LipschitzModule]] = {
    "shift": Shift,
    "space_to_depth": SpaceToDepth,
    "channel_pad": ZeroChannelPad,
    "sll_conv": SLLConv2d,
    "sum_pool": SumPool,
    "flatten": Flatten,
    "truncate": Truncate,
    "zero_pad": ZeroPadFeatures,
    "sll_linear": SLLLinear,
    "global_pool": GlobalPool,
}


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


def _module(spec: LayerSpec) -> LipschitzModule:
    return LAYER_TYPES[spec.kind](*spec.args)


def build_backbone(config: ArchConfig | str) -> LipschitzBackbone:
    if isinstance(config, str):
        config = get_config(config)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, entry in layer_plan(config):
        if isinstance(entry, LayerSpec):
            layers[name] = _module(entry)
        else:
            layers[name] = nn.Sequential(*(_module(spec) for spec in entry))
    return LipschitzBackbone(config, layers)


def transplant(source: nn.Module, target: nn.Module) -> list[str]:
    """Copies every parameter of ``source`` whose name and shape ``target`` also has (for example
    a trained s2d-lite trunk into an s2d-lite-pool backbone); returns the names copied. The
    target's other parameters keep their values."""
    src = source.state_dict()
    dst = target.state_dict()
    copied = [k for k, v in dst.items() if k in src and tuple(src[k].shape) == tuple(v.shape)]
    target.load_state_dict({**dst, **{k: src[k] for k in copied}})
    return copied
