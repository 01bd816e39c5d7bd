"""The torch-free NumPy engine: the same function and the same certificates as the torch model,
hostile files refused, and a command line that answers without importing torch."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file as save_numpy

import lipsim
from lipsim import certify
from lipsim.archs import build_backbone
from lipsim.cli import main
from lipsim.errors import CheckpointError
from lipsim.images import check_image_array, load_image_array
from lipsim.modelfiles import default_model_path
from lipsim.numpy_engine import NumpyLipSim, conv_rescaling, linear_rescaling, supported
from lipsim.quiet import torch_notices_off
from lipsim.spec import ArchConfig, expected_state, get_config, list_archs

HAVE_DEFAULT = default_model_path().exists()
TINY_S2D_JSON = get_config("tiny-s2d").to_json()


def _twin(model: lipsim.LipSim) -> NumpyLipSim:
    state = {k: v.detach().numpy() for k, v in model.backbone.state_dict().items()}
    return NumpyLipSim(model.config, state, embedding=model.embedding)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_biases(model: lipsim.LipSim, seed: int = 0) -> None:
    """Larger biases than the initialisation, so that ReLUs switch off in every layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


CONFIGS = {
    "tiny": get_config("tiny"),
    "tiny-s2d": get_config("tiny-s2d"),
    "s2d-lite": get_config("s2d-lite"),
    # the remaining layer kinds: zero-padding and truncation before the linear layers, no pool
    "pad-s2d": ArchConfig("pad-s2d", "s2d", out_dim=40, stages=((1, 4),), pool=1, linear_width=150_600,
                          depth_linear=1, n_features=8, center=0.25),
    "trunc-s2d": ArchConfig("trunc-s2d", "s2d", out_dim=40, stages=((1, 4), (1, 4)), pool=2,
                            linear_width=300, depth_linear=1, n_features=16),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("embedding", ["append", "plain"])
def test_numpy_engine_computes_the_torch_function(name, embedding):
    model = lipsim.LipSim.from_config(CONFIGS[name], embedding=embedding).eval().requires_grad_(False)
    _random_biases(model)
    twin = _twin(model)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f_torch = model.features(x).numpy()
    f_np = twin.features(x.numpy())
    assert f_np.dtype == np.float32 and f_np.shape == f_torch.shape
    assert _rel(f_np, f_torch) <= 1e-5
    # and the answers built on top of the features
    d_t, lo_t, hi_t = model.distance_with_interval(x[:2], x[1:], 0.1)
    d_n, lo_n, hi_n = twin.distance_with_interval(x[:2].numpy(), x[1:].numpy(), 0.1)
    np.testing.assert_allclose(d_n, d_t.numpy(), atol=2e-6)
    np.testing.assert_allclose(lo_n, lo_t.numpy(), atol=2e-6)
    np.testing.assert_allclose(hi_n, hi_t.numpy(), atol=2e-6)
    c_t = model.certify_2afc(x[:1], x[1:2], x[2:])
    c_n = twin.certify_2afc(x[:1].numpy(), x[1:2].numpy(), x[2:].numpy())
    assert c_n.closer.tolist() == c_t.closer.tolist()
    np.testing.assert_allclose(c_n.radius, c_t.radius.numpy(), rtol=1e-3, atol=1e-6)


def test_numpy_engine_runs_the_published_small_network():
    model = lipsim.create_model("small", embedding="plain", seed=0).requires_grad_(False)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f_torch = model.features(x).numpy()
    assert _rel(_twin(model).features(x.numpy()), f_torch) <= 1e-5


@pytest.mark.parametrize("name", list_archs())
def test_expected_state_matches_the_torch_modules(name):
    with torch.device("meta"):
        state = build_backbone(name).state_dict()
    assert expected_state(name) == {k: tuple(v.shape) for k, v in state.items()}


def test_rescalings_match_the_torch_layers():
    from lipsim.layers import sll_conv_rescaling, sll_linear_rescaling

    gen = torch.Generator().manual_seed(4)
    kernel = torch.randn(5, 7, 3, 3, generator=gen)
    weight, q = torch.randn(9, 13, generator=gen), torch.randn(9, generator=gen)
    np.testing.assert_allclose(conv_rescaling(kernel.numpy()), sll_conv_rescaling(kernel).numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        linear_rescaling(weight.numpy(), q.numpy()), sll_linear_rescaling(weight, q).numpy(), rtol=1e-5
    )


@pytest.mark.skipif(not HAVE_DEFAULT, reason="no packaged default model")
def test_numpy_engine_stretch_along_the_worst_direction_matches_power_iteration():
    """Power iteration on the torch model finds the most stretched input direction at x; the NumPy
    engine's finite difference along it must show the same stretch, and never more than 1."""
    model = lipsim.load()
    twin = NumpyLipSim.load()
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 224, 224, generator=gen) * 0.5 + 0.25
    v = torch.randn(x.shape, generator=gen)
    with torch_notices_off():  # torch's own jit-deprecation notice on first forward-AD use
        for _ in range(15):
            v = v / v.norm()
            _, jv = torch.func.jvp(model.backbone, (x,), (v,))
            _, pullback = torch.func.vjp(model.backbone, x)
            (v,) = pullback(jv)
        v = v / v.norm()
        _, jv = torch.func.jvp(model.backbone, (x,), (v,))
    estimate = float(jv.norm())
    h = 0.05
    diff = twin.features((x + h * v).numpy()).astype(np.float64) - twin.features(x.numpy())
    stretch = float(np.linalg.norm(diff)) / h
    assert 0.5 < estimate <= 1 + 1e-4
    assert stretch == pytest.approx(estimate, abs=2e-3)
    assert stretch <= 1 + 2e-3


@pytest.mark.skipif(not HAVE_DEFAULT, reason="no packaged default model")
def test_default_model_gives_the_same_answers_in_both_engines():
    from importlib import resources

    assets = resources.files("lipsim") / "assets"
    paths = [str(assets / n) for n in ("cat_a.jpg", "cat_b.jpg", "coffee.jpg")]
    twin = NumpyLipSim.load()
    model = lipsim.load()
    arrays = [load_image_array(p) for p in paths]
    tensors = [lipsim.load_image(p) for p in paths]
    for a, t in zip(arrays, tensors, strict=True):
        assert np.array_equal(a, t.numpy())
    assert _rel(twin.features(np.concatenate(arrays)), model.features(torch.cat(tensors)).numpy()) <= 1e-5
    c_n = twin.certify_2afc(*arrays)
    c_t = model.certify_2afc(*tensors)
    assert int(c_n.closer[0]) == int(c_t.closer[0]) == 0
    assert float(c_n.radius[0]) == pytest.approx(float(c_t.radius[0]), rel=1e-4)


# -- files -----------------------------------------------------------------------------------------


def _save_tiny(path, mutate=None, metadata=None):
    model = lipsim.create_model("tiny-s2d", seed=0)
    state = {k: v.detach().numpy().copy() for k, v in model.backbone.state_dict().items()}
    if mutate:
        mutate(state)
    meta = {"format": "lipsim", "format_version": "1", "arch": model.config.to_json(), "embedding": "append"}
    if metadata is not None:
        meta = metadata
    save_numpy(state, str(path), metadata=meta)
    return model


def test_numpy_engine_loads_what_lipsim_saves(tmp_path):
    model = lipsim.create_model("tiny-s2d", seed=7)
    model.save(tmp_path / "m.safetensors")
    twin = NumpyLipSim.load(tmp_path / "m.safetensors")
    assert twin.arch == "tiny-s2d" and twin.embedding == "append"
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel(twin.features(x.numpy()), model.features(x).numpy()) <= 1e-5
    assert supported(tmp_path / "m.safetensors")
    model.save(tmp_path / "run" / "model.safetensors")
    assert supported(tmp_path / "run")  # a training run folder works too
    assert NumpyLipSim.load(tmp_path / "run").arch == "tiny-s2d"


def _nan(state):
    state["stage0.0.kernel"][0, 0, 0, 0] = np.nan


def _reshape(state):
    state["head.2.weight"] = np.zeros((3, 3), np.float32)


def _drop(state):
    del state["stage0.1.q"]


def _ints(state):
    state["stage0.0.q"] = np.zeros(state["stage0.0.q"].shape, np.int32)


@pytest.mark.parametrize(
    "mutate, metadata, message",
    [
        (_nan, None, "NaN or infinite"),
        (_reshape, None, "has shape"),
        (_drop, None, "missing"),
        (_ints, None, "weights must be float16"),
        (None, {"format": "other"}, "without lipsim metadata"),
        (None, {"format": "lipsim", "arch": "{not json"}, "bad architecture metadata"),
        (
            None,
            {"format": "lipsim", "arch": '{"name": "x", "family": "s2d", "stages": []}'},
            "bad architecture",
        ),
        (
            None,
            {"format": "lipsim", "arch": get_config("tiny-s2d").to_json(), "embedding": "odd"},
            "embedding",
        ),
    ],
)
def test_numpy_engine_refuses_bad_files_with_one_line(tmp_path, mutate, metadata, message):
    path = tmp_path / "bad.safetensors"
    _save_tiny(path, mutate, metadata)
    with pytest.raises(CheckpointError, match=message) as info:
        NumpyLipSim.load(path)
    assert "\n" not in str(info.value)


def test_numpy_engine_refuses_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "m.safetensors"
    _save_tiny(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        NumpyLipSim.load(path)
    (tmp_path / "m.pth").write_bytes(b"PK\x03\x04 not ours")
    assert not supported(tmp_path / "m.pth")
    assert not supported(tmp_path / "missing.safetensors")


def test_check_image_array_errors():
    good = np.full((1, 3, 224, 224), 0.5, np.float32)
    check_image_array(good, size=224)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_image_array(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_image_array(good * 255)
    with pytest.raises(ValueError, match="floating"):
        check_image_array(good.astype(np.uint8))
    with pytest.raises(ValueError, match="224x224"):
        check_image_array(np.zeros((1, 3, 64, 64), np.float32), size=224)
    with pytest.raises(ValueError, match="RGB"):
        check_image_array(np.zeros((1, 1, 224, 224), np.float32))


# -- certificate mathematics: one implementation, two array kinds ----------------------------------


def test_certify_functions_answer_numpy_and_torch_alike():
    rng = np.random.default_rng(0)
    g0, g1 = rng.standard_normal((6, 9)), rng.standard_normal((6, 9))
    d0, d1 = rng.random(6), rng.random(6)
    r = rng.random(6) * 3 + 0.2
    t = torch.from_numpy
    cases = [
        (certify.radius_2afc, (d0, d1, g0, g1)),
        (certify.radius_2afc_plain, (d0, d1, g0, g1, r)),
        (lambda *a: certify.movement_bound(0.3, *a), (r,)),
        (lambda d: certify.distance_interval(d, 0.2), (d0,)),
        (lambda d, s: certify.distance_interval(d, 0.2, s=s), (d0, np.sqrt(2 * d0))),
        (lambda d: certify.radius_threshold(d, 0.3), (d0,)),
    ]
    for fn, args in cases:
        as_np, as_torch = fn(*args), fn(*(t(a) for a in args))
        pairs = zip(as_np, as_torch, strict=True) if isinstance(as_np, tuple) else [(as_np, as_torch)]
        for a, b in pairs:
            assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
            np.testing.assert_array_equal(a, b.numpy())


# -- command line ----------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path):
    paths = []
    rng = np.random.default_rng(0)
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def model_file(tmp_path):
    model = lipsim.create_model("tiny-s2d", seed=3)
    _random_biases(model, 3)
    model.save(tmp_path / "tiny.safetensors")
    return str(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("command", ["distance", "compare"])
def test_cli_engines_agree(photos, model_file, capsys, command):
    images = photos[:2] if command == "distance" else photos
    outs = {}
    for engine in ("numpy", "torch", "auto"):
        assert main([command, *images, "--model", model_file, "--engine", engine, "--json"]) == 0
        outs[engine] = json.loads(capsys.readouterr().out)
    assert outs["numpy"]["engine"] == outs["auto"]["engine"] == "numpy"
    assert outs["torch"]["engine"] == "torch"
    keys = ("distance",) if command == "distance" else ("d_A", "d_B", "certified_radius")
    for key in keys:
        assert outs["numpy"][key] == pytest.approx(outs["torch"][key], abs=2e-6, rel=1e-4)
    if command == "distance":
        for end in ("lo", "hi"):
            assert outs["numpy"]["interval"][end] == pytest.approx(outs["torch"]["interval"][end], abs=2e-6)
    else:
        assert outs["numpy"]["closer"] == outs["torch"]["closer"]


def test_cli_engine_numpy_refuses_what_it_cannot_run(photos, capsys):
    assert main(["distance", *photos[:2], "--model", "arch:tiny", "--engine", "numpy"]) == 1
    err = capsys.readouterr().err
    assert "--engine numpy" in err and len(err.strip().splitlines()) == 1
    # auto falls back to torch for what numpy cannot run
    assert main(["distance", *photos[:2], "--model", "arch:tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "torch"


def test_cli_bad_image_is_one_line_in_the_numpy_engine(photos, model_file, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert main(["distance", photos[0], str(broken), "--model", model_file, "--engine", "numpy"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err


def test_cli_distance_does_not_import_torch(photos, model_file):
    code = (
        "import sys, json\n"
        "from lipsim.cli import main\n"
        f"rc = main(['distance', {photos[0]!r}, {photos[1]!r}, '--model', {model_file!r}, '--json'])\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    distance, status = json.loads(lines[0]), json.loads(lines[-1])
    assert status == {"rc": 0, "torch": False}
    assert distance["engine"] == "numpy"
    model = lipsim.load(model_file)
    a, b = lipsim.load_image(photos[0]), lipsim.load_image(photos[1])
    assert distance["distance"] == pytest.approx(float(model(a, b)), abs=2e-6)


def test_import_lipsim_is_lazy():
    code = (
        "import sys, lipsim; assert 'torch' not in sys.modules; lipsim.LipSim; print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


def test_dataclass_config_round_trip_through_numpy_files(tmp_path):
    config = dataclasses.replace(get_config("tiny-s2d"), name="custom-s2d", center=0.5)
    model = lipsim.LipSim.from_config(config)
    model.save(tmp_path / "c.safetensors")
    assert NumpyLipSim.load(tmp_path / "c.safetensors").config == config


@pytest.mark.parametrize(
    "arch",
    [
        '{"name": "x", "family": "published", "depth": 1000000000, "channels": 4}',
        '{"name": "x", "family": "s2d", "stages": [[1000000000, 4]]}',
        '{"name": "x", "family": "s2d", "s2d": 0, "stages": [[1, 4]]}',
        '{"name": "x", "family": "s2d", "pool": true, "stages": [[1, 4]]}',
        '{"name": "x", "family": "s2d", "stages": [[1, 4]], "center": "NaN"}',
    ],
)
def test_hostile_architecture_metadata_is_refused_before_building(tmp_path, arch):
    path = tmp_path / "hostile.safetensors"
    _save_tiny(path, metadata={"format": "lipsim", "arch": arch, "embedding": "append"})
    for loader in (NumpyLipSim.load, lipsim.load):
        with pytest.raises(CheckpointError, match="bad architecture metadata") as info:
            loader(path)
        assert "\n" not in str(info.value)


def test_huge_but_valid_architecture_is_refused_by_its_missing_weights(tmp_path):
    """A config within bounds whose weights the file does not hold: refused from the shapes,
    before a (here 6.6 GB) model is allocated."""
    cfg = ArchConfig("big", "published", depth=2, channels=4096, depth_linear=1, n_features=2048)
    path = tmp_path / "big.safetensors"
    _save_tiny(path, metadata={"format": "lipsim", "arch": cfg.to_json(), "embedding": "append"})
    for loader in (NumpyLipSim.load, lipsim.load):
        with pytest.raises(CheckpointError, match="do not match"):
            loader(path)


def test_architecture_needing_absurd_activations_is_refused(tmp_path):
    """A published-family file with no convolutions pads the input to ``channels`` without any
    weight to show for it: 2^24 channels made a 280-byte file ask for 34 GB per forward."""
    raw = ArchConfig("bomb", "published", depth=0, channels=4, input_size=16, depth_linear=0, n_features=8)
    arch = raw.to_json().replace('"channels": 4', f'"channels": {1 << 24}')
    path = tmp_path / "bomb.safetensors"
    _save_tiny(path, metadata={"format": "lipsim", "arch": arch, "embedding": "append"})
    for loader in (NumpyLipSim.load, lipsim.load):
        with pytest.raises(CheckpointError, match="activations per image"):
            loader(path)
