"""Image decoding: messy real-world files work, broken or hostile ones fail with one line."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import lipsim
from lipsim.errors import ImageError


def _check(x, size=224):
    assert x.shape == (1, 3, size, size)
    assert x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def _gradient(w=64, h=48):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w)[None, :]
    arr[..., 1] = np.linspace(0, 255, h)[:, None]
    arr[..., 2] = 90
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "1", "I;16", "I", "F", "RGB"])
def test_modes_load(tmp_path, mode):
    img = _gradient().convert("RGBA" if mode == "RGBA" else "RGB")
    if mode in ("I;16", "I", "F"):
        arr = np.linspace(0, 1, 64 * 48).reshape(48, 64)
        if mode == "F":
            img = Image.fromarray(arr.astype(np.float32), mode="F")
        else:
            img = (
                Image.fromarray((arr * 65535).astype(np.uint16)).convert(mode)
                if mode == "I"
                else Image.fromarray((arr * 65535).astype(np.uint16))
            )
    else:
        img = img.convert(mode)
    suffix = ".tif" if mode in ("CMYK", "F", "I") else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    _check(lipsim.load_image(path))


def test_sixteen_bit_png_is_scaled_by_bit_depth(tmp_path):
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    x = lipsim.load_image(path)
    assert torch.allclose(x, torch.full_like(x, 32768 / 65535), atol=1e-3)


def test_alpha_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    path = tmp_path / "clear.png"
    img.save(path)
    assert torch.allclose(lipsim.load_image(path), torch.ones(1, 3, 224, 224))
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    assert torch.allclose(lipsim.load_image(path), torch.ones(1, 3, 224, 224))


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    x = lipsim.load_image(path)
    upright = lipsim.load_image(img.transpose(Image.Transpose.ROTATE_270))
    assert torch.allclose(x, upright, atol=0.08)
    assert x[0, :, :50].mean() > 0.8  # the white half ends up on top


def test_tiny_and_thin_images(tmp_path):
    for size in [(1, 1), (1, 3000), (3000, 1), (2, 2)]:
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (10, 200, 30)).save(path)
        _check(lipsim.load_image(path))


def test_pil_input_and_custom_size():
    x = lipsim.load_image(_gradient(), size=64)
    _check(x, 64)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        lipsim.load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        lipsim.load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="directory"):
        lipsim.load_image(tmp_path)


def test_non_image_and_truncated_files(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello, I am not a picture")
    with pytest.raises(ImageError, match="not a recognised image") as info:
        lipsim.load_image(tmp_path / "notes.jpg")
    assert "\n" not in str(info.value)
    buf = io.BytesIO()
    _gradient(256, 256).save(buf, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageError, match="cut.jpg") as info:
        lipsim.load_image(tmp_path / "cut.jpg")
    assert "\n" not in str(info.value)


def _png_chunk(kind, data):
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    width = height = 200_000  # 40 gigapixels declared, a few bytes on disk
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * 3 * 16
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(row))
    data += _png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="too large") as info:
        lipsim.load_image(path)
    assert "\n" not in str(info.value)


def test_wrong_argument_type():
    with pytest.raises(ImageError, match="path or a PIL image"):
        lipsim.load_image(42)
