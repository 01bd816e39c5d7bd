"""The frozen inference engine: a backbone's weights folded once, and a forward you can read.

:func:`fold` reads a :class:`lipsim.archs.LipschitzBackbone` once: every SLL convolution becomes
its folded weights ``(s·K, s·b, -flip(K)ᵀ)`` (:func:`lipsim.layers.fold_sll_conv`), every SLL
linear layer ``(W, b, s)``, with the rescaling ``s = 2/t`` computed in IEEE float32 from the
weights as they are at that moment; the other layers hold no weights and are kept as they are.
The result, a :class:`FrozenBackbone`, is a snapshot: it owns copies of what it needs, has no
parameters, and is never seen by training. A model whose weights change afterwards must be
frozen again; :class:`lipsim.LipSim`'s own gradient-free methods (``embed``, ``certify_2afc``,
...) fold on every call, so their certificates never rest on stale weights.

:meth:`FrozenBackbone.forward` is the one torch interpreter of the layer plan. Without autodiff
it works in channels-last buffers that it owns, each SLL convolution in place through the
fastest kernel set that passed its self-check here (:mod:`lipsim.fast`); with gradients flowing
to the input (attacks), it runs the same folded maths out of place. Under an autocast whose dtype
differs from the input's, the input is cast to that dtype first (``embed_fast``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import fast
from .archs import ArchConfig, LipschitzBackbone
from .layers import (
    SLLConv2d,
    SLLLinear,
    SpaceToDepth,
    ZeroChannelPad,
    _autodiff_free,
    fold_sll_conv,
    sll_conv,
    sll_linear,
)
from .precision import at_least_float32

__all__ = ["FrozenBackbone", "fold"]

_CL = torch.channels_last


def fold(backbone: LipschitzBackbone) -> FrozenBackbone:
    """Folds ``backbone``'s weights once into a :class:`FrozenBackbone` (see the module docstring)."""
    if isinstance(backbone, FrozenBackbone):
        return backbone
    if not isinstance(backbone, LipschitzBackbone):
        raise TypeError(f"expected a LipschitzBackbone, got {type(backbone).__name__}")
    plan: list[tuple[str, object]] = []
    tensors: dict[str, torch.Tensor] = {}
    with torch.inference_mode(False), torch.no_grad():
        for i, (name, layer) in enumerate(backbone.lipschitz_layers()):
            if type(layer) is SLLConv2d:
                kernel = at_least_float32(layer.kernel.detach())
                folded = fold_sll_conv(kernel, layer.bias.detach().to(kernel.dtype), layer.scale())
                for key, t in zip(("k1", "b1", "k2"), folded, strict=True):
                    tensors[f"{key}_{i}"] = t.contiguous()
                plan.append(("sll_conv", i))
            elif type(layer) is SLLLinear:
                weight = at_least_float32(layer.weight.detach())
                tensors[f"w_{i}"] = weight.clone()
                tensors[f"b_{i}"] = layer.bias.detach().to(weight.dtype).reshape(-1).clone()
                tensors[f"s_{i}"] = layer.scale().to(weight.dtype)
                plan.append(("sll_linear", i))
            elif next(layer.parameters(), None) is not None or next(layer.buffers(), None) is not None:
                raise TypeError(f"cannot freeze layer {name!r} ({type(layer).__name__}): it holds weights")
            elif type(layer) is SpaceToDepth:
                plan.append(("space_to_depth", layer))
            elif type(layer) is ZeroChannelPad:
                plan.append(("channel_pad", layer))
            else:  # weight-free layers run as they are
                plan.append(("module", layer))
    return FrozenBackbone(backbone.config, plan, tensors)


class FrozenBackbone(nn.Module):
    """A backbone's function with its weights folded once (built by :func:`fold`, not directly).

    Folded tensors are non-persistent buffers: ``.to(device)`` moves them, and the state dict is
    empty (save the model, not its engine). Kernel-specific layouts of the folded weights are
    derived on first use per (kernel set, device, dtype) and dropped when the buffers move.
    """

    def __init__(self, config: ArchConfig, plan: list, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.plan = plan
        for key, t in tensors.items():
            self.register_buffer(key, t, persistent=False)
        self._packed: dict = {}

    def _apply(self, fn, recurse: bool = True):
        self._packed = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_packed"] = {}  # derived layouts (oneDNN's are opaque): never pickled or deep-copied
        return state

    def _conv(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return getattr(self, f"k1_{i}"), getattr(self, f"b1_{i}"), getattr(self, f"k2_{i}")

    def _packed_conv(self, i: int, kernels: str, x: torch.Tensor) -> tuple:
        key = (i, kernels, x.device, x.dtype)
        packed = self._packed.get(key)
        if packed is None:
            packed = self._packed[key] = fast.pack(kernels, *self._conv(i), x)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        in_place = _autodiff_free(x)
        kernels = fast.kernels_for(x.device, x.dtype) if in_place else "portable"
        owned = False  # whether x is a buffer this forward created and may overwrite
        for kind, arg in self.plan:
            if kind == "sll_conv" and in_place:
                if not owned:
                    x, owned = torch.empty_like(x, memory_format=_CL).copy_(x), True
                x = fast.sll_conv_inplace(kernels, x, self._packed_conv(arg, kernels, x))
            elif kind == "sll_conv":
                x = sll_conv(x, *(t.to(x.dtype) for t in self._conv(arg)))
            elif kind == "sll_linear":
                w, b, s = (getattr(self, f"{p}_{arg}").to(x.dtype) for p in ("w", "b", "s"))
                x, owned = sll_linear(x, w, b, s), True
            elif kind == "space_to_depth" and in_place:
                x, owned = fast.space_to_depth_cl(x, arg.r), True
            elif kind == "channel_pad" and in_place:
                x, owned = fast.zero_pad_cl(x, arg.channels), True
            else:
                x, owned = arg(x), False
        return x

    def extra_repr(self) -> str:
        return f"arch={self.config.name!r}, frozen"
