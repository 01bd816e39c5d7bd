"""Native-resolution decoding and 8-bit encoding for the dataset code.

``lipsim.images.load_image`` always resizes to a square; augmentations and the synthetic 2AFC
generator need the photo at (close to) its own resolution, so this module decodes with the same
rules (file checks, EXIF orientation, alpha on white, high bit depths scaled) but keeps the shape.
All PIL use of the data package lives here.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from ..images import _decode, _eight_bit, decoding, open_image, to_pil

__all__ = ["open_rgb", "pil_to_tensor", "quantize", "save_png", "jpeg_roundtrip"]


def open_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Decodes an image file as an 8-bit RGB PIL image at native resolution.

    With ``max_side`` the image is shrunk (aspect kept) so that its longer side is at most
    ``max_side``; JPEGs are then decoded at reduced scale, which is much faster for big photos.
    Raises :class:`lipsim.errors.ImageError` with a one-line message for unusable files.
    """
    img, name = open_image(path)
    with decoding(name):
        if max_side is not None and img.format == "JPEG" and max(img.size) > max_side:
            img.draft("RGB", (max_side, max_side))
        img, white = _decode(img, name)
        if max_side is not None and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.BICUBIC)  # in place (ours), at full bit depth
        img = _eight_bit(img, white)
        return img if img.mode == "RGB" else img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> (3, H, W) float32 tensor in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] values to the 8-bit grid exactly as :func:`save_png` stores them."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0


def save_png(x: torch.Tensor, path: str | os.PathLike) -> None:
    """Writes a (3, H, W) tensor in [0, 1] as an 8-bit RGB PNG (values rounded as by :func:`quantize`)."""
    to_pil(x).save(path, format="PNG")


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encodes a (3, H, W) tensor in [0, 1] as a JPEG of the given quality and decodes it again."""
    buffer = io.BytesIO()
    to_pil(x).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as img:
        return pil_to_tensor(img)
