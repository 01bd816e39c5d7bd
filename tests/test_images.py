"""Image decoding: messy real-world files work, broken or hostile ones fail with one line."""

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import lipsim
import lipsim.images
from lipsim.data._io import open_rgb
from lipsim.errors import ImageError
from lipsim.images import load_image_array


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
    with pytest.raises(ImageError, match="a path, a PIL image, a NumPy array or a tensor"):
        lipsim.load_image(42)


def _pgm(maxval, value, width=4, height=3):
    pixels = np.full((height, width), value, ">u2" if maxval > 255 else "u1")
    return f"P5\n{width} {height}\n{maxval}\n".encode() + pixels.tobytes()


def _tiff(width_type=3, offset_type=4):
    """An 8x8 8-bit grey TIFF written by hand; the field types of ImageWidth and StripOffsets can be bent."""
    extra = 8 + 2 + 8 * 12 + 4  # where a RATIONAL (8 bytes) goes, after the IFD; the pixels follow it

    def entry(tag, kind, value):
        payload = {
            3: struct.pack("<HH", value, 0),
            5: struct.pack("<I", extra),
            11: struct.pack("<f", value),
        }.get(kind, struct.pack("<I", value))
        return struct.pack("<HHI", tag, kind, 1) + payload

    tags = [(256, width_type, 8), (257, 3, 8), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    tags += [(273, offset_type, extra + 8), (277, 3, 1), (279, 4, 64)]
    ifd = struct.pack("<H", len(tags)) + b"".join(entry(*t) for t in tags) + bytes(4)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<II", extra + 8, 1) + bytes(range(0, 256, 4))


def test_hand_made_tiff_is_valid(tmp_path):
    (tmp_path / "ok.tif").write_bytes(_tiff())
    assert load_image_array(tmp_path / "ok.tif").shape == (1, 3, 224, 224)


_CORRUPT = {
    "header.pgm": b"P5\nx 1\n255\n" + bytes(4),  # ValueError: invalid literal for int()
    "ihdr.png": b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", bytes(5)) + _png_chunk(b"IEND", b""),
    "dims.tif": _tiff(width_type=11),  # ImageWidth a FLOAT: ValueError when opened
    "offsets.tif": _tiff(offset_type=5),  # StripOffsets a RATIONAL: TypeError in the pixel decode
}


@pytest.mark.parametrize("name", list(_CORRUPT))
def test_every_decoder_failure_is_an_image_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_CORRUPT[name])
    for load in (lipsim.load_image, open_rgb):
        with pytest.raises(ImageError, match="cannot decode image") as info:
            load(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("maxval, value", [(65535, 200), (65535, 65535), (1000, 100), (300, 300), (255, 51)])
def test_pgm_is_scaled_by_its_maxval_not_by_its_pixels(tmp_path, maxval, value):
    path = tmp_path / "grey.pgm"
    path.write_bytes(_pgm(maxval, value))
    for x in (load_image_array(path), load_image_array(path, size=None)):
        assert np.allclose(x, value / maxval, atol=2e-5)
    assert np.allclose(np.asarray(open_rgb(path)), round(255 * value / maxval))


def test_integer_tiffs_are_scaled_by_their_stored_bit_depth(tmp_path):
    for kind, value, white in [
        (np.uint16, 200, 65535),
        (np.int32, 200, 2**31 - 1),
        (np.int32, 2**30, 2**31 - 1),
    ]:
        path = tmp_path / f"{value}.tif"
        Image.fromarray(np.full((6, 5), value, kind)).save(path)
        assert np.allclose(load_image_array(path), value / white, atol=1e-6)
    Image.fromarray(np.full((6, 5), -7, np.int32)).save(tmp_path / "negative.tif")
    with pytest.raises(ImageError, match=r"negative.tif: pixel values \[-7, -7\] lie outside"):
        lipsim.load_image(tmp_path / "negative.tif")
    with pytest.raises(ImageError, match="unknown bit depth"):  # a 32-bit integer image made in memory
        lipsim.load_image(Image.fromarray(np.full((6, 5), 200, np.int32)))
    x = load_image_array(Image.fromarray(np.full((6, 5), 200, np.uint16)))  # "I;16" in memory
    assert np.allclose(x, 200 / 65535)


def test_float_images_are_taken_as_unit_range(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((6, 5), 0.25, np.float32)).save(path)
    assert np.allclose(load_image_array(path), 0.25)
    for bad in (100.0, -0.5, np.nan, np.inf):
        Image.fromarray(np.full((6, 5), bad, np.float32)).save(path)
        with pytest.raises(ImageError, match=r"f.tif: pixel values .* lie outside \[0, 1\]"):
            lipsim.load_image(path)


def test_sixteen_bit_decoding_makes_no_full_size_numpy_copy(tmp_path):
    side = 1500
    path = tmp_path / "big16.png"
    Image.fromarray(np.full((side, side), 40000, np.uint16)).save(path)
    tracemalloc.start()  # sees NumPy buffers (not Pillow's): the float64 path took 32 bytes a pixel
    try:
        x = load_image_array(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < side * side
    assert np.allclose(x, 40000 / 65535, atol=1e-5)


def test_max_pixels_is_the_one_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000, refuses above 2000
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 50)).save(tmp_path / "b.png")
    assert load_image_array(tmp_path / "a.png").shape == (1, 3, 224, 224)
    with pytest.raises(ImageError, match=r"b.png: image too large \(more than 2000 pixels\)"):
        lipsim.load_image(tmp_path / "b.png")
    monkeypatch.setattr(lipsim.images, "MAX_PIXELS", 1500)
    with pytest.raises(ImageError, match=r"a.png: image too large \(40x40 pixels, limit 1500\)"):
        lipsim.load_image(tmp_path / "a.png")
    with pytest.raises(ImageError, match=r"b.png: image too large \(more than 1500 pixels\)"):
        lipsim.load_image(tmp_path / "b.png")


def test_unusable_paths_are_image_errors(tmp_path):
    long = tmp_path / ("x" * 300 + ".png")  # a name longer than the file system allows
    with pytest.raises(ImageError, match="cannot read") as info:
        lipsim.load_image(long)
    assert str(info.value).startswith(str(long))
    with pytest.raises(ImageError, match="cannot read"):
        lipsim.load_image(str(tmp_path / "nul\0.png"))
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(ImageError, match="loop.png: cannot read"):
        lipsim.load_image(tmp_path / "loop.png")


@pytest.mark.parametrize("size", [2.5, 0, -3, True, "224"])
def test_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="size must be a positive integer or None"):
        lipsim.load_image(_gradient(), size=size)


def test_size_none_keeps_the_native_resolution():
    x = lipsim.load_image(_gradient(64, 48), size=None)
    assert x.shape == (1, 3, 48, 64)
    assert torch.equal(
        x[0, :, 5, 7] * 255, torch.tensor(np.asarray(_gradient(64, 48))[5, 7], dtype=torch.float32)
    )
    grey = load_image_array(Image.fromarray(np.full((5, 7), 30000, np.uint16)), size=None)
    assert grey.shape == (1, 3, 5, 7) and np.allclose(grey, 30000 / 65535)
    assert load_image_array(_gradient(), size=np.int64(32)).shape == (1, 3, 32, 32)
