"""lipsim distance REF FILE..., --pairs, lipsim matrix, --resize; progress bars on long runs."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lipsim
from lipsim.batching import batch_slices
from lipsim.cli import main

TINY = ["--model", "arch:tiny"]


@pytest.fixture
def folder(tmp_path):
    """Four non-square photos in tmp/photos (crop and squash differ on them)."""
    root = tmp_path / "photos"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(64, 80), (90, 60), (70, 70), (50, 100)]):
        arr = (torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(arr).save(root / f"p{i}.png")
    return root


def _model():
    return lipsim.create_model("tiny", seed=0).requires_grad_(False)


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_one_reference_against_many_files(folder, capsys):
    files = [str(folder / f"p{i}.png") for i in range(4)]
    assert main(["distance", *files, *TINY, "--json"]) == 0
    out = _json(capsys)
    assert [(r["a"], r["b"]) for r in out["pairs"]] == [(files[0], f) for f in files[1:]]
    model = _model()
    ref = lipsim.load_image(files[0])
    for row, other in zip(out["pairs"], files[1:], strict=True):
        d, lo, hi = model.distance_with_interval(ref, lipsim.load_image(other), 36 / 255)
        assert row["distance"] == pytest.approx(float(d), abs=1e-6)
        assert (row["lo"], row["hi"]) == (
            pytest.approx(float(lo), abs=1e-6),
            pytest.approx(float(hi), abs=1e-6),
        )
    assert main(["distance", *files, *TINY]) == 0  # CSV on stdout
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0][:3] == ["a", "b", "distance"] and len(rows) == 4
    assert float(rows[1][2]) == pytest.approx(out["pairs"][0]["distance"], abs=1e-6)


def test_two_images_keep_the_single_answer(folder, capsys):
    assert main(["distance", str(folder / "p0.png"), str(folder / "p1.png"), *TINY, "--json"]) == 0
    assert "distance" in _json(capsys)


def test_pairs_file_relative_paths_and_csv_output(folder, tmp_path, capsys):
    pairs = folder / "pairs.csv"
    pairs.write_text("a,b\np0.png,p1.png\np2.png,p3.png\np1.png,p0.png\n")
    out = tmp_path / "res" / "d.csv"
    assert main(["distance", "--pairs", str(pairs), "--out", str(out), *TINY]) == 0
    assert "wrote 3 distances" in capsys.readouterr().out
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(r["a"], r["b"]) for r in rows] == [
        ("p0.png", "p1.png"),
        ("p2.png", "p3.png"),
        ("p1.png", "p0.png"),
    ]
    model = _model()
    want = model(lipsim.load_image(folder / "p2.png"), lipsim.load_image(folder / "p3.png"))
    assert float(rows[1]["distance"]) == pytest.approx(float(want), abs=2e-6)
    assert float(rows[0]["distance"]) == pytest.approx(float(rows[2]["distance"]), abs=2e-6)  # symmetric


def test_pairs_file_errors_are_one_line(folder, capsys):
    bad = folder / "bad.csv"
    bad.write_text("p0.png\n")
    assert main(["distance", "--pairs", str(bad), *TINY]) == 1
    err = capsys.readouterr().err
    assert "row 1" in err and err.count("\n") == 1
    assert main(["distance", "--pairs", str(folder / "missing.csv"), *TINY]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["distance", str(folder / "p0.png"), *TINY]) == 1
    assert "--pairs" in capsys.readouterr().err


def test_matrix_of_a_folder_and_of_two_folders(folder, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["matrix", str(folder), "--out", str(out), "--eps", "36/255", *TINY]) == 0
    assert "wrote a 4 x 4 distance matrix" in capsys.readouterr().out
    data = json.loads(out.read_text())
    names = [f"p{i}.png" for i in range(4)]
    assert data["rows"] == data["cols"] == names
    model = _model()
    images = torch.cat([lipsim.load_image(folder / n) for n in names])
    d, lo, hi = model.pairwise(images, eps=36 / 255)
    assert np.allclose(data["distance"], d.numpy(), atol=1e-6)
    assert np.allclose(data["lo"], lo.numpy(), atol=1e-6) and np.allclose(data["hi"], hi.numpy(), atol=1e-6)
    other = tmp_path / "other"
    other.mkdir()
    (folder / "p3.png").rename(other / "q.png")
    assert main(["matrix", str(folder), str(other), *TINY]) == 0  # CSV on stdout
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0] == ["", "q.png"] and [r[0] for r in rows[1:]] == names[:3]
    assert float(rows[1][1]) == pytest.approx(float(d[0, 3]), abs=1e-6)


def test_matrix_refuses_intervals_in_csv_and_empty_folders(folder, tmp_path, capsys):
    assert main(["matrix", str(folder), "--eps", "0.1", *TINY]) == 1
    assert "JSON" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["matrix", str(empty), *TINY]) == 1
    assert "no image files" in capsys.readouterr().err
    assert main(["matrix", str(folder), "--out", str(tmp_path / "d.txt"), *TINY]) == 1
    assert ".csv or .json" in capsys.readouterr().err


def test_matrix_with_the_numpy_engine_matches_torch(folder, tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    _model().save(path)
    results = {}
    for engine in ("numpy", "torch"):
        assert main(["matrix", str(folder), "--model", str(path), "--engine", engine, "--json"]) == 0
        out = _json(capsys)
        assert out["engine"] == engine
        results[engine] = np.array(out["distance"])
    assert np.allclose(results["numpy"], results["torch"], atol=1e-5)


def test_resize_squash_flag_keeps_the_old_stretch(folder, capsys):
    a, b = str(folder / "p1.png"), str(folder / "p3.png")
    answers = {}
    for mode in ("crop", "squash"):
        assert main(["distance", a, b, "--resize", mode, *TINY, "--json"]) == 0
        answers[mode] = _json(capsys)["distance"]
        model = _model()
        want = model(lipsim.load_image(a, resize=mode), lipsim.load_image(b, resize=mode))
        assert answers[mode] == pytest.approx(float(want), abs=1e-6)
    assert answers["crop"] != pytest.approx(answers["squash"], abs=1e-6)
    assert main(["compare", a, b, str(folder / "p0.png"), "--resize", "squash", *TINY, "--json"]) == 0


def test_progress_bar_shows_when_asked(capsys):
    assert [(s.start, s.stop) for s in batch_slices(5, 2, progress=True, desc="embedding")] == [
        (0, 2),
        (2, 4),
        (4, 5),
    ]
    err = capsys.readouterr().err
    assert "embedding" in err and "5/5" in err
    list(batch_slices(5, 2, progress=None))  # automatic: off for short runs and when not on a terminal
    assert capsys.readouterr().err == ""
