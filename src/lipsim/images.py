"""Decoding and validation of image files; the only module that touches PIL.

``load_image`` turns whatever a user hands us (a path or a PIL image) into the model's input
convention: a float32 tensor (1, 3, S, S) in [0, 1], RGB, resized with bicubic interpolation
(``load_image_array``: the same pixels as a NumPy array, for the torch-free engine; torch is
imported only by the functions that return or check tensors).
Messy files (grey, alpha, CMYK, palette, 16-bit, EXIF rotation, tiny or thin images) work;
broken ones fail with a one-line :class:`ImageError` and never exhaust memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "load_image",
    "load_image_array",
    "open_image",
    "decoding",
    "check_images",
    "check_image_array",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "to_pil",
]

#: a larger declared image is refused before decoding (decompression bombs)
MAX_PIXELS = 100_000_000
MAX_FILE_BYTES = 512 * 1024 * 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_WHITE = (255, 255, 255)


def _open(path: str | os.PathLike) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not an image")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageError(f"{p}: empty file")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{p}: file too large ({size} bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{p}: image too large (decompression bomb guard)") from None
    except OSError as exc:
        raise ImageError(f"{p}: cannot open image ({exc})") from None
    return img


def _to_float_rgb(img: Image.Image, name: str) -> Image.Image | np.ndarray:
    """Returns an 8-bit RGB PIL image, or a float (H, W, 3) array in [0, 1] for high bit depths."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        else:
            top = 65535.0 if arr.size and arr.max() > 255 or mode.startswith("I;16") else 255.0
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: image contains NaN or infinite values")
        arr = np.clip(arr / top, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _resize_float(arr: np.ndarray, size: int) -> np.ndarray:
    channels = [
        np.asarray(
            Image.fromarray(arr[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


def open_image(source) -> tuple[Image.Image, str]:
    """Opens a path (or takes a PIL image) without decoding pixels, after the size checks.

    Returns ``(image, name)``; raises :class:`ImageError` for unusable inputs."""
    if isinstance(source, Image.Image):
        img, name = source, "image"
    elif isinstance(source, (str, os.PathLike)):
        img, name = _open(source), str(source)
    else:
        raise ImageError(f"expected a path or a PIL image, got {type(source).__name__}")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({width}x{height} pixels, limit {MAX_PIXELS})")
    return img, name


@contextlib.contextmanager
def decoding(name: str) -> Iterator[None]:
    """Turns decoder failures inside the block into one-line :class:`ImageError`s."""
    try:
        yield
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{name}: cannot decode image ({msg})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode image") from None


def load_image_array(source, size: int = 224) -> np.ndarray:
    """:func:`load_image` as a NumPy float32 array (1, 3, size, size) in [0, 1]; no torch needed."""
    img, name = open_image(source)
    with decoding(name):
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_float_rgb(img, name)
        if isinstance(rgb, np.ndarray):
            arr = _resize_float(rgb, size)
        else:
            arr = np.asarray(rgb.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 0, 1)[None])


def load_image(source, size: int = 224) -> torch.Tensor:
    """Loads a path or PIL image as a (1, 3, size, size) float32 tensor in [0, 1] (RGB, bicubic).

    Alpha is composited on white; EXIF orientation is applied; 16-bit and float images are
    scaled by their bit depth. Raises :class:`lipsim.ImageError` (a ``ValueError``) with a
    one-line message for missing, empty, truncated, oversized or non-image inputs.
    """
    import torch

    return torch.from_numpy(load_image_array(source, size))


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) tensor in [0, 1] -> 8-bit RGB PIL image."""
    if x.dim() == 4:
        x = x[0]
    arr = (x.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _check_layout(shape: tuple, floating: bool, name: str, size: int | None, kind: str, dtype) -> None:
    if len(shape) != 4:
        raise ValueError(f"{name}: expected shape (B, 3, H, W), got {tuple(shape)}")
    if shape[1] != 3:
        raise ValueError(f"{name}: expected 3 RGB channels, got {shape[1]}")
    if not floating:
        raise ValueError(f"{name}: expected a floating {kind} in [0, 1], got {dtype}")
    if size is not None and (shape[2] != size or shape[3] != size):
        raise ValueError(
            f"{name}: this model takes {size}x{size} images, got {shape[2]}x{shape[3]} "
            "(lipsim.load_image resizes)"
        )
    if 0 in shape:
        raise ValueError(f"{name}: empty batch")


def _check_range(lo: float, hi: float, name: str) -> None:
    """``lo``/``hi``: the minimum and maximum (NaN if any entry is NaN)."""
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or math.isinf(hi):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name}: values must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); "
            "lipsim takes [0, 1] images, not [-1, 1] or [0, 255]"
        )


def check_images(x, name: str = "images", size: int | None = None) -> torch.Tensor:
    """Validates the API's image convention and returns ``x`` unchanged.

    (B, 3, H, W) floating tensor, finite, values in [0, 1]; optionally H = W = size.
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    _check_layout(tuple(x.shape), x.is_floating_point(), name, size, "tensor", x.dtype)
    with torch.no_grad():  # one pass: NaN propagates through aminmax, inf falls outside [0, 1]
        lo, hi = (float(v) for v in torch.aminmax(x))
    _check_range(lo, hi, name)
    return x


def check_image_array(x, name: str = "images", size: int | None = None) -> np.ndarray:
    """:func:`check_images` for NumPy arrays (the torch-free engine)."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a NumPy array, got {type(x).__name__}")
    floating = np.issubdtype(x.dtype, np.floating)
    _check_layout(x.shape, floating, name, size, "array", x.dtype)
    _check_range(float(x.min()), float(x.max()), name)  # NumPy min/max propagate NaN
    return x
