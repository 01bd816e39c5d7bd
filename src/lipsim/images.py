"""Decoding and validation of image files; the only module that touches PIL.

``load_image`` turns whatever a user hands us (a path or a PIL image) into the model's input
convention: a float32 tensor (1, 3, S, S) in [0, 1], RGB, resized with bicubic interpolation
(``load_image_array``: the same pixels as a NumPy array, for the torch-free engine; torch is
imported only by the functions that return or check tensors).
Messy files (grey, alpha, CMYK, palette, 16-bit, EXIF rotation, tiny or thin images) work;
broken ones fail with a one-line :class:`ImageError` and never exhaust memory.

Scale of high bit depths (from the mode and the file, never from the pixel values): "I;16"
images (16-bit PNG, TIFF) are white at 65535; "I" images from a PGM/PPM too (Pillow maps every
maxval above 255 onto 0..65535), from other files at the full range of the stored integer type
(``2**bits - 1``, ``2**(bits - 1) - 1`` if signed); an "I" image whose source depth is unknown
(made in memory, or already loaded and not from a PGM/PPM) is refused. Float ("F") images are
taken as [0, 1]. Values outside that range (negative integers, floats below 0 or above 1, NaN,
infinity) are an :class:`ImageError`, not clipped.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

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

#: a larger declared image is refused before decoding (decompression bombs); this is the limit,
#: Pillow's own DecompressionBombWarning (89.5 M pixels) is silenced while decoding
MAX_PIXELS = 100_000_000
MAX_FILE_BYTES = 512 * 1024 * 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_WHITE = (255, 255, 255)
_INT_RAWMODE = re.compile(r"I(?:;(8|16|32)[BLN]?(S)?)?")  # how Pillow's decoders name integer samples


@contextlib.contextmanager
def decoding(name: str) -> Iterator[None]:
    """Turns every failure inside the block (opening, decoding, converting, resizing pixels) into a
    one-line :class:`ImageError` naming ``name``. Pillow raises many types for corrupt files
    (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, ...), so any Exception
    counts. Pillow's DecompressionBombWarning is ignored here: :data:`MAX_PIXELS` is the limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image file") from None
    except Image.DecompressionBombError:  # Pillow refuses 2 * MAX_IMAGE_PIXELS before our check runs
        limit = min(MAX_PIXELS, 2 * (Image.MAX_IMAGE_PIXELS or MAX_PIXELS))
        raise ImageError(f"{name}: image too large (more than {limit} pixels)") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode image") from None
    except Exception as exc:
        if isinstance(exc, OSError) and exc.strerror:
            raise ImageError(f"{name}: cannot read ({exc.strerror})") from None
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ImageError(f"{name}: cannot decode image ({msg})") from None


def _open(path: str | os.PathLike) -> Image.Image:
    p = Path(path)
    try:
        info = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"{p}: no such file") from None
    except (OSError, ValueError) as exc:  # a name too long, a symbolic-link loop, no permission, NUL
        raise ImageError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{p}: is a directory, not an image")
    if info.st_size == 0:
        raise ImageError(f"{p}: empty file")
    if info.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{p}: file too large ({info.st_size} bytes)")
    with decoding(str(p)):
        return Image.open(p)


def _white(img: Image.Image, name: str) -> float | None:
    """The value of white for a high-bit-depth mode (see the module docstring); None for 8-bit modes.

    Reads the decoder's raw mode, so it must run before ``img.load()``."""
    if img.mode == "F":
        return 1.0
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM"):
        return 65535.0
    if img.mode != "I":
        return None
    tile = getattr(img, "tile", None)  # only images opened from a file have one
    args = tile[0].args if tile else None
    raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
    match = _INT_RAWMODE.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise ImageError(f"{name}: 32-bit integer image of unknown bit depth (convert it to 'I;16' or 'L')")
    bits = int(match[1] or 32)
    return float(2 ** (bits - 1 if match[2] or not match[1] else bits) - 1)


def _decode(img: Image.Image, name: str) -> tuple[Image.Image, float]:
    """Decodes the pixels of an opened image: ``(image, white)``.

    8-bit images come back as "L" or "RGB" (white 255; alpha composited on white, palettes and
    other colour spaces converted); high bit depths ("I;16*", "I", "F") as one float32 band "F",
    values not yet divided by ``white``, so that callers resize before scaling and before
    expanding grey to three channels. Call inside :func:`decoding`.
    """
    white = _white(img, name)
    img.load()
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose would copy every image
        img = ImageOps.exif_transpose(img)
    if white is not None:
        if img.mode == "F":
            pixels = np.asarray(img)  # NumPy's min and max propagate NaN, getextrema skips it
            lo, hi = float(pixels.min()), float(pixels.max())
        else:
            lo, hi = img.getextrema() if img.mode == "I" else (0, white)
        if not 0.0 <= lo <= hi <= white:  # False for NaN
            raise ImageError(f"{name}: pixel values [{lo:.6g}, {hi:.6g}] lie outside [0, {white:.6g}]")
        return (img if img.mode == "F" else img.convert("F")), white  # resampled in float32, unclipped
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _WHITE)
        rgb.paste(rgba, mask=rgba)  # = alpha_composite on white, with two fewer full-size copies
        return rgb, 255.0
    return (img if img.mode in ("L", "RGB") else img.convert("L" if img.mode == "1" else "RGB")), 255.0


def _eight_bit(img: Image.Image, white: float) -> Image.Image:
    """A decoded high-bit-depth "F" image as 8-bit "L", rounded (Pillow's F -> L clips and
    truncates); 8-bit images unchanged."""
    return img if img.mode != "F" else img.point(lambda v: v * (255.0 / white) + 0.5).convert("L")


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


def load_image_array(source, size: int | None = 224) -> np.ndarray:
    """:func:`load_image` as a NumPy float32 array (1, 3, size, size) in [0, 1]; no torch needed."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    img, name = open_image(source)
    with decoding(name):
        img, white = _decode(img, name)
        if size is not None:
            img = img.resize((int(size), int(size)), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / np.float32(white)
    np.clip(arr, 0.0, 1.0, out=arr)
    arr = np.repeat(arr[None], 3, axis=0) if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr[None])


def load_image(source, size: int | None = 224) -> torch.Tensor:
    """Loads a path or PIL image as a (1, 3, size, size) float32 tensor in [0, 1] (RGB, bicubic).

    ``size=None`` keeps the image's own height and width. Alpha is composited on white; EXIF
    orientation is applied; 16-bit and float images are scaled by their bit depth (module
    docstring), never by their contents. Raises :class:`lipsim.ImageError` (a ``ValueError``) with
    a one-line message naming the file for missing, empty, corrupt, truncated, oversized or
    non-image inputs, and ``ValueError`` for a ``size`` that is not a positive integer.
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
