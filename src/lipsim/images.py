"""Decoding and validation of image files; the only module that touches PIL.

``load_image``/``preprocess`` turn whatever a user hands us (a path, a PIL image, a NumPy array,
a tensor) into the model's input convention: a float32 tensor (B, 3, S, S) in [0, 1], RGB, resized
with bicubic interpolation, aspect kept and centre-cropped by default (``resize="squash"``
stretches instead)
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

from .errors import ImageError, one_line

if TYPE_CHECKING:
    import torch

__all__ = [
    "load_image",
    "load_image_array",
    "preprocess",
    "RESIZE_MODES",
    "crop_geometry",
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
        raise ImageError(f"{name}: cannot decode image ({one_line(exc)})") from None


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
        raise ImageError(
            f"expected a path, a PIL image, a NumPy array or a tensor, got {type(source).__name__}"
        )
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({width}x{height} pixels, limit {MAX_PIXELS})")
    return img, name


#: how an image that is not already size×size becomes one: "crop" (default) resizes the shorter
#: side to ``size`` (aspect kept) and takes the centre ``size``×``size`` square, as torchvision's
#: ``Resize(size)`` + ``CenterCrop(size)`` and DreamSim's preprocessing do; "squash" resizes both
#: sides to ``size`` (the aspect ratio changes; lipsim's behaviour before crop became the default)
RESIZE_MODES = ("crop", "squash")


def _check_size_resize(size, resize) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(new_width, new_height, left, top)``: the shorter side resized to ``size``, the longer one
    to ``int(size * long / short)`` (truncated, as torchvision), and the offset of the centred
    ``size``×``size`` square in the resized image (``int(round(extra / 2))``)."""
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


#: "crop" resizes the whole image and then cuts the centre square (exactly torchvision's and
#: DreamSim's pixels) unless the resized image would have more pixels than this (a thin strip)
_FULL_RESIZE_PIXELS = 16_000_000


def _resize_pil(img: Image.Image, size: int, resize: str) -> Image.Image:
    """Bicubic resize of a decoded image to size×size. "crop" resizes the whole image, then crops;
    for a resized image above :data:`_FULL_RESIZE_PIXELS` only the centre square is resampled
    (Pillow's ``box``: the same geometry, 8-bit rounding between Pillow's two passes may differ)."""
    if resize == "squash":
        return img.resize((size, size), Image.BICUBIC)
    width, height = img.size
    new_w, new_h, left, top = crop_geometry(width, height, size)
    if new_w * new_h <= _FULL_RESIZE_PIXELS:
        return img.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + size, top + size))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.BICUBIC, box=box)


def _array_image(x: np.ndarray, name: str) -> np.ndarray | Image.Image:
    """A NumPy HWC (or HW grey) image: uint8 as a PIL image (decoded then exactly as a file with
    the same pixels), float as float32 (3, H, W) planes, which must already lie in [0, 1]; an
    alpha channel is composited on white either way."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        hint = (
            " (channels first? pass x.transpose(1, 2, 0))" if x.ndim == 3 and x.shape[0] in (1, 3, 4) else ""
        )
        raise ImageError(f"{name}: expected an HxWxC array with C in 1, 3, 4, got shape {x.shape}{hint}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ImageError(f"{name}: image has no pixels")
    if x.shape[0] * x.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({x.shape[1]}x{x.shape[0]} pixels, limit {MAX_PIXELS})")
    if x.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(x[:, :, 0] if x.shape[2] == 1 else x))
    if not np.issubdtype(x.dtype, np.floating):
        raise ImageError(f"{name}: expected a uint8 or floating array, got {x.dtype}")
    arr = x.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if not 0.0 <= lo <= hi <= 1.0:  # False for NaN
        raise ImageError(
            f"{name}: float pixel values [{lo:.6g}, {hi:.6g}] lie outside [0, 1] (uint8 arrays are "
            "divided by 255; floats must already be in [0, 1])"
        )
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:]
        arr = arr[:, :, :3] * alpha + (1.0 - alpha)
    arr = arr.transpose(2, 0, 1)
    return np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr


def _resize_planes(arr: np.ndarray, size: int | None, resize: str, name: str) -> np.ndarray:
    """(C, H, W) float32 planes resized one by one as Pillow "F" images (bicubic in float32, no
    8-bit rounding); values are clipped back to [0, 1] after the bicubic overshoot."""
    if size is None or arr.shape[1:] == (size, size):
        return np.ascontiguousarray(arr, dtype=np.float32)
    with decoding(name):
        planes = [
            np.asarray(_resize_pil(Image.fromarray(np.ascontiguousarray(p)), size, resize)) for p in arr
        ]
    out = np.stack(planes).astype(np.float32, copy=False)
    return np.clip(out, 0.0, 1.0, out=out)


def _file_array(source, size: int | None, resize: str) -> np.ndarray:
    """A path or PIL image as float32 (3, S, S) in [0, 1] (the module docstring's decoding)."""
    img, name = open_image(source)
    with decoding(name):
        img, white = _decode(img, name)
        if size is not None:
            img = _resize_pil(img, int(size), resize)
        arr = np.asarray(img, dtype=np.float32) / np.float32(white)
    np.clip(arr, 0.0, 1.0, out=arr)
    arr = np.repeat(arr[None], 3, axis=0) if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _is_tensor(x) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch" and hasattr(x, "detach")


def _one_array(source, size: int | None, resize: str, name: str) -> np.ndarray:
    if isinstance(source, np.ndarray):
        image = _array_image(source, name)
        if isinstance(image, Image.Image):
            return _file_array(image, size, resize)
        return _resize_planes(image, size, resize, name)
    if _is_tensor(source):
        return _one_tensor(source, size, resize, name).detach().cpu().numpy()[0]
    return _file_array(source, size, resize)


def load_image_array(source, size: int | None = 224, resize: str = "crop") -> np.ndarray:
    """:func:`load_image` as a NumPy float32 array (B, 3, size, size) in [0, 1]; no torch needed
    (unless ``source`` is a tensor, which means torch is already there)."""
    _check_size_resize(size, resize)
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ImageError("no images given")
    arrays = [_one_array(item, size, resize, f"image {i}") for i, item in enumerate(items)]
    if len({a.shape for a in arrays}) > 1:
        raise ImageError("images of different sizes cannot form one batch with size=None")
    return np.ascontiguousarray(np.stack(arrays))


def _one_tensor(x, size: int | None, resize: str, name: str) -> torch.Tensor:
    """A (3, H, W) or (B, 3, H, W) tensor (float in [0, 1] or uint8) as float32 (B, 3, S, S),
    resized with torch's antialiased bicubic interpolation so that gradients flow through it
    (close to Pillow's bicubic, not bit-identical); already size×size: only checked."""
    import torch
    import torch.nn.functional as F

    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ImageError(f"{name}: expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise ImageError(f"{name}: expected a floating (in [0, 1]) or uint8 tensor, got {x.dtype}")
    x = x.float()
    check_images(x, name)
    height, width = int(x.shape[2]), int(x.shape[3])
    if size is None or (height, width) == (size, size):
        return x
    if resize == "squash":
        out = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    else:
        new_w, new_h, left, top = crop_geometry(width, height, size)
        out = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        out = out[:, :, top : top + size, left : left + size]
    return out.clamp(0.0, 1.0)


def preprocess(source, size: int | None = 224, resize: str = "crop") -> torch.Tensor:
    """Any image (or a list of them) as the model's input: a float32 tensor (B, 3, size, size) in [0, 1].

    Accepts a path, a PIL image, a NumPy HxWxC (or HxW) array (uint8, divided by 255, or float in
    [0, 1]; an alpha channel is composited on white), a (3, H, W)/(B, 3, H, W) tensor (float in
    [0, 1] or uint8), or a list of these (stacked into one batch). ``resize="crop"`` (default)
    keeps the aspect ratio: the shorter side becomes ``size`` and the centre square is kept, as
    torchvision's ``Resize`` + ``CenterCrop`` and DreamSim do; ``resize="squash"`` stretches the
    image to size×size. Files and arrays are resampled with Pillow's bicubic filter (in float32),
    tensors with torch's antialiased bicubic, which keeps gradients; a tensor that already has
    the right size is returned unchanged (as float32). ``size=None`` keeps the native size.

    Certificates are about the network input: a radius bounds perturbations of this 224×224
    tensor, not of the original file before resizing.
    """
    import torch

    _check_size_resize(size, resize)
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ImageError("no images given")
    batch = []
    for i, item in enumerate(items):
        name = "image" if len(items) == 1 else f"image {i}"
        if _is_tensor(item):
            batch.append(_one_tensor(item, size, resize, name))
        else:
            batch.append(torch.from_numpy(_one_array(item, size, resize, name))[None])
    if len({tuple(t.shape[1:]) for t in batch}) > 1:
        raise ImageError("images of different sizes cannot form one batch with size=None")
    return batch[0] if len(batch) == 1 else torch.cat(batch)


def load_image(source, size: int | None = 224, resize: str = "crop") -> torch.Tensor:
    """Loads an image as a (1, 3, size, size) float32 tensor in [0, 1] (RGB, bicubic); see
    :func:`preprocess` for what it accepts and how it resizes (aspect kept and centre-cropped by
    default, ``resize="squash"`` stretches).

    ``size=None`` keeps the image's own height and width. Alpha is composited on white; EXIF
    orientation is applied; 16-bit and float images are scaled by their bit depth (module
    docstring), never by their contents. Raises :class:`lipsim.ImageError` (a ``ValueError``) with
    a one-line message naming the file for missing, empty, corrupt, truncated, oversized or
    non-image inputs, and ``ValueError`` for a ``size`` that is not a positive integer.
    """
    return preprocess(source, size=size, resize=resize)


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
