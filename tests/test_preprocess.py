"""lipsim.preprocess / load_image: any input type, aspect-preserving centre crop by default."""

import numpy as np
import pytest
import torch
from PIL import Image

import lipsim
from lipsim.images import load_image_array


def _photo(width=300, height=150, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def _by_hand(img: Image.Image, size=224) -> np.ndarray:
    """Resize the shorter side to ``size`` (longer side truncated), then cut the centre square."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    big = np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255
    return big[top : top + size, left : left + size].transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(300, 150), (150, 300), (225, 640), (224, 224)])
def test_default_is_shorter_side_then_centre_crop(shape):
    img = Image.fromarray(_photo(*shape))
    x = lipsim.preprocess(img)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert np.abs(x[0].numpy() - _by_hand(img)).max() < 1e-6


def test_crop_keeps_the_aspect_and_cuts_the_sides():
    arr = np.full((100, 300, 3), 128, np.uint8)
    arr[:, :60] = (255, 0, 0)  # a red band on the left fifth of a wide image
    x = lipsim.preprocess(arr)[0]
    assert float(x[0, :, :5].mean()) < 0.6  # the band lies outside the centre square
    squashed = lipsim.preprocess(arr, resize="squash")[0]
    assert float(squashed[0, :, :5].mean()) > 0.95  # stretched, the band stays


def test_squash_is_the_previous_behaviour():
    img = Image.fromarray(_photo(300, 150))
    expected = np.asarray(img.resize((224, 224), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.abs(lipsim.load_image(img, resize="squash")[0].numpy() - expected).max() < 1e-6


def test_square_images_are_the_same_in_both_modes(tmp_path):
    path = tmp_path / "sq.png"
    Image.fromarray(_photo(300, 300)).save(path)
    assert torch.equal(lipsim.load_image(path), lipsim.load_image(path, resize="squash"))


def test_every_input_type_gives_the_same_image(tmp_path):
    arr = _photo(320, 200)
    path = tmp_path / "p.png"
    Image.fromarray(arr).save(path)
    from_path = lipsim.preprocess(path)
    assert torch.equal(lipsim.preprocess(str(path)), from_path)
    assert torch.equal(lipsim.preprocess(Image.fromarray(arr)), from_path)
    assert torch.equal(lipsim.preprocess(arr), from_path)  # uint8 arrays decode exactly as files
    as_float = lipsim.preprocess(arr.astype(np.float32) / 255)  # resampled in float, not 8-bit
    assert (as_float - from_path).abs().mean() < 2e-3  # noise overshoots: Pillow clips 8-bit passes
    as_tensor = lipsim.preprocess(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert (as_tensor - as_float).abs().max() < 1e-4  # torch's antialiased bicubic vs Pillow's
    as_uint8_tensor = lipsim.preprocess(torch.from_numpy(arr).permute(2, 0, 1))
    assert torch.equal(as_uint8_tensor, as_tensor)
    assert np.array_equal(load_image_array(path), from_path.numpy())


def test_grey_and_alpha_arrays():
    grey = _photo(80, 60)[:, :, 0]
    x = lipsim.preprocess(grey)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    rgba = np.zeros((60, 80, 4), np.float32)  # fully transparent: white
    assert float(lipsim.preprocess(rgba).min()) == 1.0


def test_a_list_is_a_batch_and_tensors_of_the_right_size_pass_through():
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    assert lipsim.preprocess(x) is x
    batch = lipsim.preprocess([_photo(), Image.fromarray(_photo(seed=1)), x[0]])
    assert batch.shape == (3, 3, 224, 224)
    small = torch.rand(1, 3, 64, 96, requires_grad=True)
    out = lipsim.preprocess(small)
    out.sum().backward()  # resizing a tensor keeps the graph
    assert out.shape == (1, 3, 224, 224) and torch.isfinite(small.grad).all()


def test_size_none_keeps_the_native_size():
    assert lipsim.preprocess(_photo(90, 70), size=None).shape == (1, 3, 70, 90)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((3, 40, 50), np.uint8), "channels first"),
        (np.full((40, 50, 3), 2.0, np.float32), r"outside \[0, 1\]"),
        (np.full((40, 50, 3), np.nan, np.float32), r"outside \[0, 1\]"),
        (np.zeros((40, 50, 3), np.int16), "uint8 or floating"),
        (np.zeros((0, 50, 3), np.uint8), "no pixels"),
        (torch.zeros(2, 4, 32, 32), r"\(3, H, W\)"),
        (torch.full((3, 32, 32), 255.0), r"\[0, 1\]"),
        ([], "no images"),
    ],
)
def test_bad_inputs_are_one_line_errors(value, message):
    with pytest.raises(ValueError, match=message) as info:
        lipsim.preprocess(value)
    assert "\n" not in str(info.value)


def test_bad_resize_mode():
    with pytest.raises(ValueError, match="resize must be one of crop, squash"):
        lipsim.preprocess(_photo(), resize="stretch")


def test_thin_strip_is_cropped_without_building_the_full_resize():
    strip = np.full((2, 20000, 3), 200, np.uint8)  # resized whole it would be 224 x 2.24 M pixels
    x = lipsim.preprocess(strip)
    assert x.shape == (1, 3, 224, 224)
    assert abs(float(x.mean()) - 200 / 255) < 1e-3


def test_bundled_photos_have_paths():
    from lipsim import assets

    assert assets.names() == ["cat_a.jpg", "cat_b.jpg", "coffee.jpg"]
    assert lipsim.load_image(assets.path("cat_a.jpg")).shape == (1, 3, 224, 224)
    with pytest.raises(FileNotFoundError, match="bundled"):
        assets.path("dog.jpg")
