"""Which torch devices this machine can use, answered with one line instead of torch's raw error.

``lipsim.load(device=...)``, ``lipsim.create_model(device=...)`` and every command's ``--device``
go through :func:`usable_device` before any work starts.
"""

from __future__ import annotations

import re

import torch

from .errors import LipSimError

__all__ = ["DeviceError", "usable_device", "short_reason"]

#: longest reason quoted from torch in a device error
REASON_CHARS = 160


class DeviceError(LipSimError, ValueError):
    """A device that does not exist or cannot be used on this machine."""


def short_reason(text: str, limit: int = REASON_CHARS) -> str:
    """The first sentence of ``text`` on one line, at most ``limit`` characters, cut only between
    words (never inside a URL or a path): torch's device errors run to several sentences."""
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    if len(sentence) <= limit:
        return sentence
    cut = sentence[: limit + 1].rsplit(" ", 1)[0]
    return (cut if cut and len(cut) <= limit else sentence[:limit]) + " ..."


def usable_device(device) -> torch.device:
    """``torch.device(device)`` after checking that a tensor can be placed on it; otherwise a
    :class:`DeviceError` whose message is one line (``'cuda'`` without a GPU says so, with torch's
    first sentence as the reason)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DeviceError(f"device {str(device)!r} is not usable here ({short_reason(str(exc))})") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = short_reason(str(exc)) if str(exc).strip() else type(exc).__name__
        hint = ""
        if dev.type == "cuda" and not torch.cuda.is_available():
            hint = "; this machine has no usable CUDA GPU, use device 'cpu'"
        raise DeviceError(f"device {str(device)!r} is not usable here ({reason}){hint}") from None
    return dev
