"""Command line: distance, compare, verify; errors are one line without a traceback."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import lipsim
from lipsim.cli import CliError, main, parse_eps_list
from lipsim.verify import verify_model


@pytest.fixture
def photos(tmp_path):
    paths = []
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        arr = (torch.rand(64, 80, 3, generator=gen) * 255).byte().numpy()
        path = tmp_path / f"p{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


def test_distance_json(photos, capsys):
    assert main(["distance", photos[0], photos[1], "--model", "arch:tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = lipsim.create_model("tiny", seed=0)
    a, b = lipsim.load_image(photos[0]), lipsim.load_image(photos[1])
    assert out["distance"] == pytest.approx(float(model(a, b).detach()), abs=1e-6)
    assert out["interval"]["lo"] <= out["distance"] <= out["interval"]["hi"]
    assert out["untrained"] is True


def test_compare_json_and_text(photos, capsys):
    assert main(["compare", photos[0], photos[1], photos[2], "--model", "arch:tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["closer"] in ("A", "B")
    assert (out["closer"] == "A") == (out["d_A"] < out["d_B"])
    assert out["certified_radius"] >= 0
    assert main(["compare", photos[0], photos[1], photos[2], "--model", "arch:tiny"]) == 0
    text = capsys.readouterr().out
    assert "closer to REF" in text and "certificate" in text and "untrained" in text


def test_compare_identical_candidates_is_a_tie(photos, capsys):
    assert main(["compare", photos[0], photos[1], photos[1], "--model", "arch:tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["closer"] == "tie" and out["certified_radius"] == 0


def test_errors_are_one_line(photos, tmp_path, capsys):
    assert main(["distance", photos[0], str(tmp_path / "missing.png"), "--model", "arch:tiny"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    assert main(["distance", photos[0], photos[1], "--model", str(bad)]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_verify_passes_for_registered_architecture(capsys):
    assert main(["verify", "tiny", "--iters", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_embedding_estimate"] <= 1 + 1e-4
    assert all(layer["ok"] for layer in report["layers"])


def test_verify_fails_on_a_layer_without_a_bound():
    model = lipsim.create_model("tiny", seed=0)
    model.backbone.linear.append(torch.nn.Linear(1176, 1176))
    report = verify_model(model, iters=5)
    assert not report.passed
    assert any(layer.bound is None for layer in report.layers)


def test_verify_fails_when_a_layer_is_not_one_lipschitz():
    model = lipsim.create_model("tiny", seed=0)
    model.backbone.linear.append(torch.nn.Linear(1176, 1176))
    with torch.no_grad():
        model.backbone.linear[-1].weight.copy_(3 * torch.eye(1176))
    report = verify_model(model, iters=10)
    assert report.max_embedding_estimate > 1.0 or not report.passed


def test_parse_eps_list():
    assert parse_eps_list("36/255, 0.5") == pytest.approx([36 / 255, 0.5])
    for bad in ("nan", "0.1,nan", "-0.1", "nan/1", ""):
        with pytest.raises(CliError):
            parse_eps_list(bad)


def test_unusable_device_is_a_one_line_error(photos, capsys):
    assert main(["distance", photos[0], photos[1], "--model", "arch:tiny", "--device", "banana"]) == 1
    assert "device 'banana' is not usable" in capsys.readouterr().err


def test_python_dash_m_entry_point(photos):
    proc = subprocess.run(
        [sys.executable, "-m", "lipsim", "distance", photos[0], photos[0], "--model", "arch:tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["distance"] == pytest.approx(0.0, abs=1e-6)
