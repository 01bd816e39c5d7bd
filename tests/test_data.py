"""Dataset readers and the synthetic 2AFC generator, on tiny folders built in each test."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipsim.data import (
    FAMILIES,
    BappsDataset,
    DatasetError,
    DistillDataset,
    DistillViews,
    ImageFolderDataset,
    NightDataset,
    make_2afc,
)
from lipsim.data.synthetic import SHIFT_MARGIN, family_shift_vs_noise, mirror
from lipsim.errors import ImageError


def photo(seed: int, width: int = 160, height: int = 120) -> Image.Image:
    """A random but structured RGB image: smooth colour waves, a few rectangles, fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 6.3)
        channels.append(0.5 + 0.3 * np.sin(fx * xx + fy * yy + phase))
    img = np.stack(channels, axis=2)
    for _ in range(4):
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        img[y0 : y0 + rng.integers(8, 40), x0 : x0 + rng.integers(8, 40)] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.04, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="RGB")


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def tensor_of(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


# --------------------------------------------------------------------------- image folders


def test_image_folder_keys_are_sorted_relative_posix_paths(tmp_path):
    save(photo(1), tmp_path / "n02" / "b.JPEG")
    save(photo(2), tmp_path / "n01" / "z.png")
    save(photo(3), tmp_path / "n01" / "deep" / "a.jpg")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    save(photo(4), tmp_path / "n01" / ".hidden.png")
    ds = ImageFolderDataset(tmp_path, size=32)
    assert ds.keys == ["n01/deep/a.jpg", "n01/z.png", "n02/b.JPEG"]
    image, key = ds[1]
    assert key == "n01/z.png"
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    pil, key = ImageFolderDataset(tmp_path, transform=lambda im: im)[2]
    assert key == "n02/b.JPEG" and pil.size == (160, 120) and pil.mode == "RGB"


def test_image_folder_skips_unreadable_files_and_records_them(tmp_path):
    save(photo(1), tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "c.jpg").write_bytes(b"")
    save(photo(2), tmp_path / "d.png")
    with pytest.raises(ImageError, match="b.png"):
        ImageFolderDataset(tmp_path, size=16)[1]
    ds = ImageFolderDataset(tmp_path, size=16, skip_unreadable=True)
    image, key = ds[1]
    assert key == "d.png" and image.shape == (3, 16, 16)
    assert ds.bad == ["b.png", "c.jpg"]
    assert ds[2][1] == "d.png" and ds.bad == ["b.png", "c.jpg"]  # known bad files are not retried
    assert ds[3][1] == "d.png"


def test_image_folder_skips_files_that_fail_inside_the_decoder(tmp_path):
    (tmp_path / "a.pgm").write_bytes(b"P5\nx 1\n255\n\0")  # Pillow: ValueError, not OSError
    ihdr = b"IHDR" + bytes(5)  # a truncated IHDR chunk
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 5) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    (tmp_path / "b.png").write_bytes(png)
    save(photo(1), tmp_path / "c.png")
    with pytest.raises(ImageError, match="a.pgm: cannot decode image"):
        ImageFolderDataset(tmp_path, size=16)[0]
    ds = ImageFolderDataset(tmp_path, size=16, skip_unreadable=True)
    assert ds[0][1] == "c.png" and ds.bad == ["a.pgm", "b.png"]
    views = ImageFolderDataset(tmp_path, transform=lambda im: im.size, skip_unreadable=True)
    assert views[0] == ((160, 120), "c.png") and views.bad == ["a.pgm", "b.png"]


def test_image_folder_errors_for_empty_or_all_unreadable(tmp_path):
    with pytest.raises(DatasetError, match="no image files"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="none of the 1"):
        ImageFolderDataset(tmp_path, skip_unreadable=True)[0]


# --------------------------------------------------------------------------- distillation views


@pytest.mark.parametrize("mode", ["published", "random-resized"])
def test_distill_dataset_shapes_and_determinism(tmp_path, mode):
    save(photo(1, 300, 260), tmp_path / "c1" / "a.png")
    save(photo(2, 120, 90), tmp_path / "c2" / "b.png")  # smaller than 224: padded in published mode
    ds = DistillDataset(tmp_path, mode=mode, seed=3)
    item = ds[0]
    assert set(item) == {"view_a", "view_b", "key"} and item["key"] == "c1/a.png"
    for name in ("view_a", "view_b"):
        assert item[name].shape == (3, 224, 224) and item[name].dtype == torch.float32
        assert 0.0 <= float(item[name].min()) and float(item[name].max()) <= 1.0
    again = DistillDataset(tmp_path, mode=mode, seed=3)[0]
    assert torch.equal(item["view_a"], again["view_a"]) and torch.equal(item["view_b"], again["view_b"])
    small = ds[1]["view_a"]
    if mode == "published":
        assert float(small[:, :60].abs().max()) == 0.0  # zero padding above the 90-px-high image
    else:
        assert float(small.std()) > 0.05  # resized to fill the view


def test_published_view_a_is_a_centre_crop_with_optional_flip():
    img = photo(5, 400, 300)
    full = tensor_of(img)
    crop = full[:, 38:262, 88:312]
    flips = set()
    for seed in range(12):
        view_a, view_b = DistillViews("published")(img, torch.Generator().manual_seed(seed))
        assert view_b.shape == view_a.shape
        if torch.equal(view_a, crop):
            flips.add(False)
        else:
            assert torch.equal(view_a, torch.flip(crop, dims=[-1]))
            flips.add(True)
    assert flips == {False, True}


def test_cache_view_is_view_a_without_its_flip():
    img = photo(5, 400, 300)
    views = DistillViews("published")
    crop = tensor_of(img)[:, 38:262, 88:312]
    assert torch.equal(views.cache_view(img), crop)
    assert torch.equal(views.cache_view(tensor_of(img)), crop)
    whole = DistillViews("random-resized").cache_view(img)
    assert whole.shape == (3, 224, 224) and float(whole.std()) > 0.05


# --------------------------------------------------------------------------- NIGHT


def write_night(root: Path, rows, header=None, make_files=True):
    """rows: (id, right_vote, votes, split, is_imagenet); files named after the id."""
    header = header or [
        "id",
        "left_vote",
        "right_vote",
        "votes",
        "ref_path",
        "left_path",
        "right_path",
        "prompt",
        "split",
        "is_imagenet",
    ]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for k, (rid, p, votes, split, imagenet) in enumerate(rows):
            paths = [f"ref/000/{rid}.png", f"distort/000/{rid}_0.png", f"distort/000/{rid}_1.png"]
            writer.writerow([rid, 1 - p, p, votes, *paths, "an image of a cat", split, imagenet])
            if make_files:
                for j, rel in enumerate(paths):
                    save(photo(100 * k + j, 40, 30), root / rel)


NIGHT_ROWS = [
    ("7", 1.0, 6, "train", True),
    ("8", 0.0, 6, "test", True),
    ("9", 1.0, 5, "test", True),  # too few votes
    ("10", 0.0, 6, "test", False),
    ("11", 1.0, 6.0, "test", False),
    ("12", 0.0, 6, "val", False),
]


def test_night_reads_columns_by_position_and_filters_votes(tmp_path):
    # positional columns get odd names on purpose: the loader must not rely on them
    header = ["key", "l", "label", "votes", "r", "a", "b", "prompt", "split", "is_imagenet"]
    write_night(tmp_path, NIGHT_ROWS, header=header)
    ds = NightDataset(tmp_path, split="test", size=48)
    assert [r.id for r in ds.records] == ["8", "10", "11"]
    assert ds.group_counts() == {"test_imagenet": 1, "test_no_imagenet": 2}
    item = ds[2]
    assert set(item) == {"ref", "x0", "x1", "y", "id", "group", "family"}
    assert item["id"] == "11" and item["group"] == "test_no_imagenet" and item["family"] == ""
    assert item["y"].dtype == torch.float64 and item["y"].shape == () and float(item["y"]) == 1.0
    assert item["ref"].shape == (3, 48, 48)
    expected = tensor_of(Image.open(tmp_path / "distort/000/11_1.png").resize((48, 48), Image.BICUBIC))
    assert torch.allclose(item["x1"], expected)  # column 6 is x1
    assert NightDataset(tmp_path, split="test", min_votes=5).group_counts()["test_imagenet"] == 2


def test_night_split_selection_and_groups(tmp_path):
    write_night(tmp_path, NIGHT_ROWS)
    imagenet = NightDataset(tmp_path, split="test_imagenet")
    assert [r.id for r in imagenet.records] == ["8"] and imagenet.records[0].group == "test_imagenet"
    assert [r.id for r in NightDataset(tmp_path, split="test_no_imagenet").records] == ["10", "11"]
    train = NightDataset(tmp_path, split="train")
    assert [(r.id, r.group, r.y) for r in train.records] == [("7", "train", 1.0)]
    assert NightDataset(tmp_path, split="val")[0]["group"] == "val"


def test_night_errors_are_one_line_value_errors(tmp_path):
    with pytest.raises(DatasetError, match="data.csv: no such file"):
        NightDataset(tmp_path)
    write_night(tmp_path, NIGHT_ROWS)
    (tmp_path / "distort/000/10_1.png").unlink()
    with pytest.raises(ValueError, match=r"missing image file .*10_1\.png"):
        NightDataset(tmp_path, split="test")
    assert len(NightDataset(tmp_path, split="train")) == 1  # other splits are unaffected
    with pytest.raises(DatasetError, match="no triplets in split 'train' with votes >= 7"):
        NightDataset(tmp_path, split="train", min_votes=7)
    with pytest.raises(DatasetError, match="unknown NIGHT split"):
        NightDataset(tmp_path, split="testing")
    other = tmp_path / "other"
    write_night(
        other, NIGHT_ROWS, header=["id", "l", "r", "votes", "ref", "a", "b", "prompt", "part", "inet"]
    )
    with pytest.raises(DatasetError, match="missing column.*split"):
        NightDataset(other, split="train")
    for exc in (DatasetError, ImageError):
        assert issubclass(exc, ValueError)


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.png", "ref/../../outside.png", ""])
def test_night_refuses_image_paths_outside_the_root(tmp_path, path):
    write_night(tmp_path / "night", NIGHT_ROWS)
    save(photo(1), tmp_path / "outside.png")
    csv_path = tmp_path / "night" / "data.csv"
    rows = list(csv.reader(csv_path.read_text().splitlines()))
    rows[3][5] = path  # the third data row, id 9: kept with min_votes=5
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert len(NightDataset(tmp_path / "night", split="test")) == 3  # that row is filtered out
    with pytest.raises(
        DatasetError, match=r"data.csv:4: left_path \(column 5\) must be a relative path"
    ) as info:
        NightDataset(tmp_path / "night", split="test", min_votes=5)
    assert "\n" not in str(info.value)
    rows[3][5] = "ref/../distort/000/9_0.png"  # ".." that stays inside is fine
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert len(NightDataset(tmp_path / "night", split="test", min_votes=5)) == 4


# --------------------------------------------------------------------------- BAPPS


def write_bapps(base: Path, split: str, category: str, judges: dict[str, float]):
    for k, (stem, y) in enumerate(judges.items()):
        for j, part in enumerate(("ref", "p0", "p1")):
            save(photo(1000 + 10 * k + j, 64, 64), base / split / category / part / f"{stem}.png")
        (base / split / category / "judge").mkdir(parents=True, exist_ok=True)
        np.save(base / split / category / "judge" / f"{stem}.npy", np.array([y], dtype=np.float32))


def test_bapps_layout_pairing_and_range(tmp_path):
    base = tmp_path / "bapps" / "2afc"
    write_bapps(base, "val", "cnn", {"000010": 0.2, "000002": 0.8, "000001": 1.0})
    write_bapps(base, "val", "traditional", {"000000": 0.4})
    write_bapps(base, "val", "unlisted", {"000000": 0.0})
    ds = BappsDataset(tmp_path, split="val", size=32)
    assert ds.categories == ["traditional", "cnn"]  # default list order, only those present
    assert [r.id for r in ds.records] == ["traditional/000000", "cnn/000001", "cnn/000002", "cnn/000010"]
    assert [r.y for r in ds.records] == [0.4, 1.0, 0.8, 0.2]  # exactly, from float32 judge files
    item = ds[2]
    assert item["group"] == "cnn" and item["id"] == "cnn/000002" and item["family"] == ""
    assert float(item["y"]) == 0.8 and item["y"].dtype == torch.float64
    for name in ("ref", "x0", "x1"):
        assert item[name].shape == (3, 32, 32)
        assert float(item[name].min()) >= 0.0 and float(item[name].max()) <= 1.0
    assert float(item["ref"].min()) < 0.3  # [0, 1], not [-1, 1]: dark pixels are near 0, not -1
    expected = tensor_of(Image.open(base / "val/cnn/p1/000002.png").resize((32, 32), Image.BICUBIC))
    assert torch.allclose(item["x1"], expected)
    # the three accepted roots
    assert len(BappsDataset(tmp_path / "bapps", categories=["cnn"])) == 3
    assert len(BappsDataset(base, categories="traditional")) == 1
    assert BappsDataset(base, categories=["unlisted"]).group_counts() == {"unlisted": 1}


def test_bapps_errors(tmp_path):
    base = tmp_path / "2afc"
    write_bapps(base, "val", "mix", {"000000": 0.5})
    with pytest.raises(DatasetError, match="no category folders"):
        BappsDataset(tmp_path, split="val")
    with pytest.raises(DatasetError, match="missing category folder.*color"):
        BappsDataset(tmp_path, split="val", categories=["mix", "color"])
    with pytest.raises(DatasetError, match="no BAPPS split 'train'"):
        BappsDataset(tmp_path, split="train")
    write_bapps(base, "train", "cnn", {"000000": 0.5, "000001": 0.0})
    (base / "train/cnn/p0/000001.png").rename(base / "train/cnn/p0/000003.png")
    with pytest.raises(DatasetError, match="do not pair up"):
        BappsDataset(tmp_path, split="train")
    np.save(base / "val/mix/judge/000000.npy", np.array([1.5]))
    with pytest.raises(DatasetError, match="000000.npy"):
        BappsDataset(tmp_path, split="val", categories=["mix"])


def test_bapps_judge_must_be_one_real_fraction(tmp_path):
    base = tmp_path / "2afc"
    write_bapps(base, "val", "cnn", {"000000": 0.5})
    judge = base / "val/cnn/judge/000000.npy"
    huge = io.BytesIO()  # a header declaring 80 GB of float64 in front of 8 bytes
    np.lib.format.write_array_header_1_0(huge, {"descr": "<f8", "fortran_order": False, "shape": (10**10,)})
    cases = {
        "dtype complex128": np.array([0.5 + 2j]),  # was read as 0.5, the imaginary part dropped
        "dtype [('a', '<f8')]": np.zeros(1, dtype=[("a", "<f8")]),  # was a TypeError
        "dtype <U3": np.array(["0.5"]),
        "dtype bool": np.array([True]),
        "shape (2,)": np.array([0.5, 0.5]),
        "shape (0,)": np.zeros(0),
        "got nan": np.array([np.nan]),
        "cannot read judgement": huge.getvalue() + bytes(8),  # was a MemoryError
    }
    for message, value in cases.items():
        if isinstance(value, bytes):
            judge.write_bytes(value)
        else:
            np.save(judge, value)
        with pytest.raises(DatasetError, match=f"000000.npy: .*{re.escape(message)}") as info:
            BappsDataset(base, categories="cnn")
        assert "\n" not in str(info.value)
    for value in (np.float32(0.25), np.array([[1]], dtype=np.uint8)):  # any one real number in [0, 1]
        np.save(judge, value)
        assert BappsDataset(base, categories="cnn").records[0].y == float(value.reshape(-1)[0])


# --------------------------------------------------------------------------- synthetic 2AFC


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for k in range(3):
        save(photo(50 + k, 320, 256), root / f"p{k}.png")
    return root


@pytest.fixture(scope="module")
def generated(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("night") / "synthetic"
    summary = make_2afc(photos, out, n=2 * len(FAMILIES), seed=7)
    return out, summary


def l2(a, b):
    return float(torch.linalg.vector_norm(a - b))


def test_make_2afc_reads_back_with_known_answers(generated):
    out, summary = generated
    assert summary["n"] == 18 and summary["families"] == {name: 2 for name in FAMILIES}
    with open(out / "data.csv") as handle:
        header = next(csv.reader(handle))
    assert (
        header
        == "id,left_vote,right_vote,votes,ref_path,left_path,right_path,family,split,is_imagenet".split(",")
    )
    assert (out / "ref/000/000.png").is_file() and (out / "distort/000/017_1.png").is_file()
    meta = {t["id"]: t for t in json.loads((out / "synthetic.json").read_text())["triplets"]}
    ds = NightDataset(out, split="test")
    assert len(ds) == 18 and ds.group_counts() == {"synthetic": 18}  # not "test_no_imagenet"
    ones = {name: 0 for name in FAMILIES}
    for i in range(len(ds)):
        item = ds[i]
        family, y = item["family"], float(item["y"])
        ones[family] += int(y)
        closer, farther = (item["x1"], item["x0"]) if y == 1.0 else (item["x0"], item["x1"])
        ref = item["ref"]
        assert ref.shape == (3, 224, 224)
        if family == "mirror":
            assert torch.equal(closer, mirror(ref))
        elif family == "shift-vs-noise":
            dx, dy = meta[int(item["id"])]["params"]["dx"], meta[int(item["id"])]["params"]["dy"]
            # closer[y, x] = ref[y + dy, x + dx] wherever both exist: a pure translation
            shifted = closer[:, max(0, -dy) : 224 - max(0, dy), max(0, -dx) : 224 - max(0, dx)]
            source = ref[:, max(0, dy) : 224 - max(0, -dy), max(0, dx) : 224 - max(0, -dx)]
            assert (dx, dy) != (0, 0) and max(abs(dx), abs(dy)) <= 3
            assert torch.equal(shifted, source)
            assert 0.0 < l2(farther, ref) < l2(closer, ref)  # pixel l2 prefers the wrong image
        elif family in ("noise", "blur", "contrast"):
            assert l2(closer, ref) < l2(farther, ref)
        assert not torch.equal(closer, farther)
    assert ones == {name: 1 for name in FAMILIES}  # labels balanced within each family


def test_make_2afc_is_deterministic_under_seed(photos, generated, tmp_path):
    out, _ = generated
    families = ["view", "shift-vs-noise", "jpeg", "geometric"]
    make_2afc(photos, tmp_path / "a", n=4, seed=7, families=families)
    make_2afc(photos, tmp_path / "b", n=4, seed=7, families=families)
    make_2afc(photos, tmp_path / "c", n=4, seed=8, families=families)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 14
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    differ = [rel for rel in files if rel.suffix == ".png"]
    assert any((tmp_path / "a" / r).read_bytes() != (tmp_path / "c" / r).read_bytes() for r in differ)
    # a triplet depends on (seed, index, family) only, whatever the family list around it
    assert (tmp_path / "a/ref/000/000.png").read_bytes() == (out / "ref/000/000.png").read_bytes()


def test_shift_vs_noise_construction_on_a_flat_photo_edge_case():
    flat = torch.full((3, 100, 100), 0.5)
    flat[:, :, 50:] = 0.7  # a single edge: translation changes only a few columns
    t = family_shift_vs_noise(flat, flat, np.random.default_rng(0), size=64)
    assert 0.0 < l2(t.farther, t.ref) < l2(t.closer, t.ref)
    assert t.ref.shape == (3, 64, 64) and SHIFT_MARGIN >= 3


def test_make_2afc_input_errors(photos, tmp_path):
    lonely = tmp_path / "one"
    save(photo(1), lonely / "only.png")
    with pytest.raises(DatasetError, match="at least 2 photos"):
        make_2afc(lonely, tmp_path / "o1", n=2)
    with pytest.raises(DatasetError, match="unknown family sharpen"):
        make_2afc(photos, tmp_path / "o2", families=["blur", "sharpen"])
    make_2afc(photos, tmp_path / "o3", n=1, families=["mirror"])
    with pytest.raises(DatasetError, match="already contains data.csv"):
        make_2afc(photos, tmp_path / "o3", n=1, families=["mirror"])
    assert make_2afc(photos, tmp_path / "o3", n=1, families=["mirror"], overwrite=True)["n"] == 1
    # an output folder inside the photo folder is never read back as photos
    save(photo(2), lonely / "second.png")
    for _ in range(2):
        summary = make_2afc(lonely, lonely / "generated", n=2, families=["noise"], overwrite=True)
        assert summary["photos"] == 2


def test_make_2afc_command(photos, tmp_path, capsys):
    from lipsim.cli.data import register

    parser = argparse.ArgumentParser(prog="lipsim")
    register(parser.add_subparsers(dest="command"))
    argv = ["make-2afc", "--images", str(photos), "--out", str(tmp_path / "o"), "--n", "3", "--seed", "1"]
    args = parser.parse_args(argv + ["--families", "mirror,blur", "contrast", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["families"] == {"mirror": 1, "blur": 1, "contrast": 1} and summary["n"] == 3
    args = parser.parse_args(argv + ["--families", "noise", "--overwrite", "--split", "val"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("wrote 3 triplets (val split") and "noise 3" in text
    assert NightDataset(tmp_path / "o", split="val").group_counts() == {"val": 3}


def test_cli_family_names_match_the_generator():
    from lipsim.cli.data import FAMILY_NAMES
    from lipsim.data.synthetic import FAMILIES

    assert tuple(FAMILIES) == FAMILY_NAMES
