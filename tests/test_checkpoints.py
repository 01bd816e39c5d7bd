"""Model files: our safetensors format, published .pth checkpoints, hostile files."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lipsim
from conftest import published_file
from lipsim.checkpoints import default_model_path, load_published, save_model
from lipsim.errors import CheckpointError


def reference_published_features(state, x, depth, depth_linear, channels, out_dim):
    """An independent straightforward implementation of the published network (plain torch)."""
    h = torch.cat([x, torch.zeros(x.shape[0], channels - 3, *x.shape[2:])], dim=1)
    for i in range(depth):
        k, b = state[f"convs.{i}.kernel"], state[f"convs.{i}.bias"]
        gram = F.conv2d(k, k, padding=2)
        t = gram.abs().sum((1, 2, 3))
        t = torch.where(t > 0, 2 / t, torch.zeros_like(t))
        r = F.relu(F.conv2d(h, k, bias=b.flatten(), padding=1)) * t.view(1, -1, 1, 1)
        h = h - F.conv_transpose2d(r, k, padding=1)
    h = F.avg_pool2d(h, 4, divisor_override=4)
    h = F.avg_pool2d(h, 4, divisor_override=4).flatten(1)
    for j in range(1, depth_linear + 1):
        w, b, q = state[f"linear.{j}.weight"], state[f"linear.{j}.bias"], state[f"linear.{j}.q"]
        t = (torch.exp(-q)[:, None] * (w @ w.T) * torch.exp(q)[None, :]).abs().sum(1)
        r = F.relu(h @ w.T + b) * (2 / t)
        h = h - r @ w
    return h[:, :out_dim]


def test_safetensors_round_trip_is_exact(tmp_path, tiny, images):
    path = tmp_path / "m.safetensors"
    tiny.save(path)
    loaded = lipsim.load(path)
    assert loaded.arch == "tiny" and loaded.embedding == "append"
    assert torch.allclose(loaded.embed(images), tiny.embed(images), atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training


def test_lipsim_save_writes_what_model_save_writes(tmp_path, tiny, images):
    """``lipsim.save(model, path)`` beside ``lipsim.load``: the file ``model.save`` writes (same
    header metadata, same tensors; safetensors orders the header's entries as it likes)."""
    from safetensors import safe_open

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny.save(a)
    lipsim.save(tiny, b)
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert fa.metadata() == fb.metadata() and fa.metadata()["arch"] == tiny.config.to_json()
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    assert torch.equal(lipsim.load(b).embed(images), tiny.embed(images))
    with pytest.raises(TypeError, match="LipSim"):
        lipsim.save(tiny.backbone, tmp_path / "c.safetensors")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, tiny):
    path = tmp_path / "sub" / "m.safetensors"
    save_model(tiny, path, extra_metadata={"teacher": "x"})
    assert sorted(os.listdir(path.parent)) == ["m.safetensors"]


def test_published_checkpoint_matches_reference_network(tmp_path, images):
    source = lipsim.create_model("tiny", embedding="plain", seed=7)
    path = tmp_path / "model.ckpt-435_margin=0.5.pth"
    published_file(source, path)
    model = load_published(path, out_dim=64)
    assert model.embedding == "plain" and model.arch == "tiny"
    state = {k: v for k, v in source.backbone.state_dict().items()}
    x, y = images[:2], images[2:]
    fx = reference_published_features(state, x, 2, 1, 6, 64)
    fy = reference_published_features(state, y, 2, 1, 6, 64)
    reference = 1 - F.cosine_similarity(fx, fy, eps=1e-6)
    assert torch.allclose(model(x, y), reference, atol=1e-5)
    cert = model.certify_2afc(x, y, images[[1, 0]])
    g0, g1 = model.embed(y), model.embed(images[[1, 0]])
    assert (cert.radius <= (cert.d0 - cert.d1).abs() / (g0 - g1).norm(dim=1) + 1e-7).all()


@pytest.mark.slow
def test_published_small_checkpoint_loads_and_matches_reference(tmp_path):
    source = lipsim.create_model("small", embedding="plain", seed=1)
    path = tmp_path / "model.ckpt-1.pth"
    published_file(source, path)
    model = lipsim.load(path)
    assert model.arch == "small" and model.embedding == "plain"
    x = torch.rand(2, 3, 224, 224)
    state = source.backbone.state_dict()
    with torch.no_grad():
        ref = reference_published_features(state, x, 20, 7, 45, 1792)
        assert torch.allclose(model.features(x), ref, atol=1e-5, rtol=1e-5)
        d_ref = 1 - F.cosine_similarity(ref[:1], ref[1:], eps=1e-6)
        assert torch.allclose(model(x[:1], x[1:]), d_ref, atol=1e-5)


def test_published_keys_without_duplicates_and_with_backbone_prefix(tmp_path, images):
    source = lipsim.create_model("tiny", embedding="plain", seed=8)
    state = {f"module.backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    path = tmp_path / "plain.pth"
    torch.save({"model_state_dict": state}, path)
    model = lipsim.load(path, embedding="plain", out_dim=64)
    with torch.no_grad():
        assert torch.allclose(model.features(images), source.features(images), atol=1e-6)


def test_disagreeing_duplicates_are_refused(tmp_path):
    source = lipsim.create_model("tiny", seed=0)
    path = tmp_path / "bad.pth"
    published_file(source, path)
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["module.model.base.1.0.kernel"] += 1.0
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="disagree"):
        lipsim.load(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model_state_dict": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="refused") as info:
        lipsim.load(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_malicious_torch_zip_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil_zip.pth"
    torch.save({"model_state_dict": {"x": _Exploit()}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        lipsim.load(path)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_a_malicious_training_checkpoint_is_refused_by_the_same_reader(tmp_path, monkeypatch):
    """``--resume``/``--init`` read ``last.pt`` through the reader ``lipsim.load`` uses."""
    from lipsim.train.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": "lipsim-train", "model": {"x": _Exploit()}}, path)
    for read in (load_checkpoint, lipsim.load):
        with pytest.raises(CheckpointError, match="refused") as info:
            read(path)
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="refused"):
        lipsim.load(tmp_path / "run")
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_modelfiles_reads_model_files_without_torch(tmp_path, tiny):
    """The torch-free module reads our files (NumPy arrays) and maps the published layout."""
    path = tmp_path / "m.safetensors"
    tiny.save(path)
    code = (
        "import sys, numpy as np\n"
        "from lipsim import modelfiles as mf\n"
        f"found = mf.read_safetensors({str(path)!r}, framework='numpy')\n"
        "assert found.config.name == 'tiny' and found.embedding == 'append'\n"
        "mf.check_state(found.state, found.config, 'm', lambda a: bool(np.isfinite(a).all()))\n"
        "pub = {'module.model.' + k: v for k, v in found.state.items()}\n"
        "convs = {k[6:]: v for k, v in found.state.items() if k.startswith('convs.')}\n"
        "pub.update({'module.model.base.1.' + k: v for k, v in convs.items()})\n"
        "config, state = mf.published_layout(pub, 64, 'p', np.array_equal)\n"
        "assert config.name == 'tiny' and sorted(state) == sorted(found.state)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"this is not a model", "not a PyTorch checkpoint nor a safetensors file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json", "not a readable safetensors file"),
    ],
)
def test_corrupt_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "m.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        lipsim.load(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such model file"):
        lipsim.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        lipsim.load(tmp_path)


def test_safetensors_without_metadata_or_with_nan_is_refused(tmp_path, tiny):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.backbone.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="metadata"):
        lipsim.load(plain)
    bad = lipsim.create_model("tiny", seed=1)
    with torch.no_grad():
        bad.backbone.linear[1].weight[0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    bad.save(path)
    with pytest.raises(CheckpointError, match="NaN"):
        lipsim.load(path)


def test_wrong_shapes_are_refused(tmp_path):
    model = lipsim.create_model("tiny", seed=0)
    path = tmp_path / "m.safetensors"
    model.save(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["linear.1.weight"] = tensors["linear.1.weight"][:, :10].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="shape"):
        lipsim.load(path)


def _resaved(tmp_path, change):
    """The tiny model's file with its tensors changed by ``change(tensors)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    lipsim.create_model("tiny", seed=0).save(path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        # integer, boolean and 8-bit float weights are no model (torch cast them silently)
        (lambda t: t.update({"linear.1.bias": t["linear.1.bias"].to(torch.int32)}), "dtype int32"),
        (lambda t: t.update({"linear.1.bias": t["linear.1.bias"] > 0}), "dtype bool"),
        (lambda t: t.update({"linear.1.q": t["linear.1.q"].to(torch.float8_e4m3fn)}), "dtype float8"),
        # finite in float64, infinite once in float32, the precision the network runs in
        (lambda t: t.update({"convs.0.kernel": t["convs.0.kernel"].double() * 1e300}), "NaN or infinite"),
    ],
)
def test_weights_of_unusable_dtypes_or_range_are_refused(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message) as info:
        lipsim.load(_resaved(tmp_path, change))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({1: s.pop("module.model.convs.0.bias")}), "not a named tensor"),
        (lambda s: s.update({"module.model.convs.0.bias": 3}), "not a named tensor"),
        (lambda s: s.update({"module.model.linear.1.weight": torch.ones(4)}), "2-d weight"),
        (lambda s: s.update({"module.model.convs.0.kernel": torch.ones(2, 0, 3, 3)}), "4-d kernel"),
        (lambda s: s.update({"module.model.convs.x.kernel": torch.ones(2, 6, 3, 3)}), "do not match"),
        (lambda s: s.update({"module.model.convs.0.bias": torch.ones(2, dtype=torch.complex64)}), "complex"),
    ],
)
def test_malformed_published_checkpoints_give_one_line_errors(tmp_path, change, message):
    path = tmp_path / "m.pth"
    published_file(lipsim.create_model("tiny", seed=0), path, duplicate=False)
    obj = torch.load(path, weights_only=True)
    change(obj["model_state_dict"])
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_published(path, out_dim=64)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_non_checkpoint_file_is_not_called_malicious(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.pth"
    Image.new("RGB", (8, 8)).save(path, format="PNG")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        lipsim.load(path)


def test_default_model_loads_offline_or_explains_how_to_get_one():
    if default_model_path().exists():
        model = lipsim.load()
        assert model.embedding == "append"
        x = torch.rand(1, 3, 224, 224)
        assert model(x, x).abs().item() < 1e-5
    else:
        with pytest.raises(CheckpointError, match="train"):
            lipsim.load()
