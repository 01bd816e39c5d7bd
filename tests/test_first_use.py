"""What a new user tripped over (issue 14, "Broken" and "Confusing"): each test here failed on the
code the issue was filed against.

Tiny registered architectures and tiny data only; the fake teacher is a module written to
tmp_path and named with ``py:module:factory``, as a user would plug in their own.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lipsim
from conftest import importable_module
from lipsim.cli import main
from lipsim.devices import DeviceError, short_reason, usable_device
from lipsim.errors import LipSimError

TEACHER = '''
import torch
from torch import nn


class Teacher(nn.Module):
    """A frozen random projection of 8x8-pooled images to 16 unit-norm dimensions."""

    name = "first-use-fake"
    dim = 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.proj = nn.Linear(3 * 8 * 8, self.dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) * 0.1)
            self.proj.bias.zero_()
        self.requires_grad_(False)

    @property
    def device(self):
        return self.proj.weight.device

    def forward(self, x):
        e = self.proj(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))
        return e / e.norm(dim=1, keepdim=True)


def build():
    return Teacher()
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def teacher_module(tmp_path_factory):
    with importable_module(tmp_path_factory.mktemp("teacher"), "first_use_teacher", TEACHER) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four small photos of different colour gradients."""
    root = tmp_path_factory.mktemp("photos")
    yy, xx = np.mgrid[0:60, 0:80] / 60.0
    for i in range(4):
        arr = np.stack([(xx * (c + 1) + yy * i + 0.3 * c) % 1.0 for c in range(3)], -1)
        Image.fromarray((arr * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def _distill_args(photos, out, *extra) -> list[str]:
    return [
        "train", "distill", "--data-dir", str(photos), "--teacher", "py:first_use_teacher:build",
        "--arch", "tiny-s2d", "--out", str(out), "--batch-size", "2", "--views", "random-resized",
        "--num-workers", "0", "--no-progress", "--quiet", "--json", *extra,
    ]  # fmt: skip


# -- Broken -----------------------------------------------------------------------------------------
def test_train_without_device_runs(tmp_path, photos, teacher_module, capsys):
    """Every documented 'lipsim train ...' omits --device; its default 'auto' must train."""
    out = tmp_path / "run"
    code = main(_distill_args(photos, out, "--steps", "2"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["step"] == 2
    assert lipsim.load(out).arch == "tiny-s2d"


def test_train_default_workers_fit_the_machine(monkeypatch):
    """The loader-worker default is capped by the usable CPUs (4 workers on 2 CPUs made torch warn
    on every documented 'lipsim train' run here)."""
    from lipsim.cli import build_parser

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    args = build_parser().parse_args(["train", "distill", "--data-dir", "d", "--teacher", "t",
                                      "--arch", "tiny-s2d", "--out", "o"])  # fmt: skip
    assert args.num_workers == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    args = build_parser().parse_args(["train", "distill", "--data-dir", "d", "--teacher", "t",
                                      "--arch", "tiny-s2d", "--out", "o"])  # fmt: skip
    assert args.num_workers == 4


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, photos, teacher_module):
    """A run folder stopped after one of three steps: checkpoints/last.pt, no model.safetensors."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    code = main(_distill_args(photos, out, "--steps", "3", "--stop-after", "1", "--device", "cpu"))
    assert code == 0
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "model.safetensors").exists()
    return out


def test_load_accepts_a_training_checkpoint_and_a_run_folder(interrupted_run, images):
    ckpt = torch.load(interrupted_run / "checkpoints" / "last.pt", weights_only=True)
    for source in (interrupted_run / "checkpoints" / "last.pt", interrupted_run, str(interrupted_run)):
        model = lipsim.load(source)
        assert model.arch == "tiny-s2d" and model.embedding == ckpt["embedding"]
        state = model.backbone.state_dict()
        assert all(torch.equal(state[k], v.float()) for k, v in ckpt["model"].items())
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert lipsim.load(interrupted_run, embedding="plain").embedding == "plain"
    # what --init accepts, lipsim.load accepts, and they agree (one loader behind both)
    from lipsim.train.finetune import load_init

    init, _, _ = load_init(str(interrupted_run))
    x, y = images[:2], images[2:]
    assert torch.equal(init.eval()(x, y), lipsim.load(interrupted_run, embedding="append")(x, y))


def test_the_cli_takes_a_run_folder_as_model(interrupted_run, tmp_path, capsys):
    a = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 70, np.uint8)).save(a)
    assert main(["distance", str(a), str(a), "--model", str(interrupted_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == "tiny-s2d" and out["engine"] == "torch"
    assert out["distance"] == pytest.approx(0, abs=1e-6)


def test_a_damaged_training_checkpoint_is_a_one_line_checkpoint_error(interrupted_run, tmp_path):
    ckpt = torch.load(interrupted_run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["model"].pop(next(iter(ckpt["model"])))
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(lipsim.CheckpointError) as info:
        lipsim.load(tmp_path / "last.pt")
    assert "\n" not in str(info.value)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(lipsim.CheckpointError, match="model.safetensors or checkpoints/last.pt"):
        lipsim.load(tmp_path / "empty_run")


@pytest.mark.skipif(importlib.util.find_spec("dreamsim") is not None, reason="dreamsim is installed")
def test_dreamsim_teacher_without_the_package_says_what_to_install(tmp_path, photos, capsys):
    code = main(
        ["train", "distill", "--data-dir", str(photos), "--teacher", "dreamsim", "--arch", "tiny",
         "--out", str(tmp_path / "run"), "--steps", "1", "--num-workers", "0"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "pip install dreamsim" in err and "internal error" not in err


NVIDIA = (
    "Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
    "driver from http://www.nvidia.com/Download/index.aspx"
)


def test_device_reasons_are_cut_between_words_never_inside_a_url():
    assert short_reason(NVIDIA) == "Found no NVIDIA driver on your system."
    long = "no device: see " + "x" * 30 + " and http://example.org/" + "a" * 80 + " for more " * 5
    cut = short_reason(long, limit=60)
    assert len(cut) <= 64 and "http" not in cut and cut.endswith(" ...")
    url = "https://example.org/a/b/c"
    assert url in short_reason(f"read {url} please", limit=60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line_in_the_cli_and_the_library(tmp_path, capsys):
    a = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(a)
    assert main(["distance", str(a), str(a), "--model", "arch:tiny", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' is not usable" in err
    assert "http" not in err or "http://www.nvidia.com/Download/index.aspx" in err  # no half URL
    for call in (lambda: lipsim.load(device="cuda"), lambda: lipsim.create_model("tiny", device="cuda")):
        with pytest.raises(LipSimError) as info:
            call()
        assert isinstance(info.value, DeviceError) and "\n" not in str(info.value)
        assert "cpu" in str(info.value)
    assert usable_device("cpu") == torch.device("cpu")


# -- Confusing --------------------------------------------------------------------------------------
def test_certificate_line_states_the_eps_given(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(a)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(b)
    assert main(["distance", str(a), str(b), "--model", "arch:tiny", "--eps", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "norm ≤ 0.5 " in text and "36/255" not in text and "0.141" not in text
    assert main(["distance", str(a), str(b), "--model", "arch:tiny"]) == 0
    assert "norm ≤ 36/255 (0.141)" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), str(a), "--model", "arch:tiny"]) == 0
    assert "36/255" not in capsys.readouterr().out  # compare takes no eps: nothing to quote


def test_mifgsm_reaches_its_budget_or_says_so(images):
    from lipsim.evaluate import report
    from lipsim.evaluate.attacks import AttackSettings, perturb_references
    from lipsim.evaluate.metrics import LipSimMetric

    eps, steps = 1.0, 5
    default = AttackSettings("mifgsm", "l2", eps, steps=steps)
    assert default.reaches_budget and default.reach >= eps
    metric = LipSimMetric(lipsim.create_model("tiny", seed=0))
    ref, x0, x1 = images[:2] * 0.5 + 0.25, images[2:], images[:2]
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    adv = perturb_references(metric, ref, x0, x1, y, default).adv
    norms = torch.linalg.vector_norm((adv - ref).double().flatten(1), dim=1)
    assert float(norms.max()) == pytest.approx(eps, rel=1e-3)  # it goes all the way to ε
    assert float(norms.max()) <= eps

    harness = AttackSettings("mifgsm", "l2", 3.0, step_size=0.01)  # 100 × 0.01 = 1 < 3
    assert not harness.reaches_budget and harness.reach == pytest.approx(1.0)
    payload = {
        "dataset": "night", "split": "test", "attack": "mifgsm", "norm": "l2", "eps": 3.0, "steps": 100,
        "metric": "lipsim", "n": 1, "natural_2afc": 1.0, "attacked_2afc": 1.0, "n_flipped": 0,
        "l2_budget": 3.0, "certified_2afc": None, "max_delta_l2": 1.0, "max_delta_linf": 0.1,
        "n_projected": 0, "reach": harness.reach, "reaches_budget": harness.reaches_budget,
    }  # fmt: skip
    assert "less than ε = 3" in report.attack_text(payload)
    assert AttackSettings("pgd", "l2", 3.0).step_size == 0.01  # PGD keeps the harness step


def test_synthetic_2afc_data_is_not_labelled_as_a_night_split(photos, tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["make-2afc", "--images", str(photos), "--out", str(out), "--n", "3", "--size", "64"]) == 0
    capsys.readouterr()
    assert main(["eval", "night", "--data-dir", str(out), "--model", "arch:tiny", "--batch-size", "3"]) == 0
    text = capsys.readouterr().out
    assert "test_no_imagenet" not in text and "synthetic" in text


def test_summary_defines_its_source_tags():
    from lipsim.evaluate.report import eval_summary_markdown

    result = {"dataset": "night", "split": "test", "n": 1, "natural_2afc": 1.0, "certified": []}
    text = eval_summary_markdown(result)
    tags = [tag for tag in ("[RB]", "[FC]", "[DS]") if tag in text]
    assert "[RB]" in tags and "[FC]" in tags
    defined = text.split("Sources:")[1]
    for tag in tags:
        assert f"- {tag} " in defined


def test_model_card_speaks_to_its_readers():
    card = Path(lipsim.__file__).parent / "weights" / "MODEL_CARD.md"
    assert "the issue" not in card.read_text(encoding="utf-8")


def test_verify_prints_no_torch_deprecation_notice():
    proc = subprocess.run(
        [sys.executable, "-m", "lipsim", "verify", "tiny", "--iters", "2", "--n-random", "1"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


def test_refusing_a_pickle_prints_no_torch_warning(tmp_path):
    path = tmp_path / "model.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model_state_dict": {"w": 1}}, fh, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(lipsim.CheckpointError):
            lipsim.load(path)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_certify_2afc_broadcasts_one_reference(engine, tiny, images, tmp_path):
    ref, x0, x1 = images[:1], images[1:], images[:3].flip(0)
    if engine == "numpy":
        from lipsim.numpy_engine import NumpyLipSim

        tiny.save(tmp_path / "tiny.safetensors")
        model = NumpyLipSim.load(tmp_path / "tiny.safetensors")
        ref, x0, x1 = ref.numpy(), x0.numpy(), x1.numpy()
        full = np.repeat(ref, 3, axis=0)
    else:
        model = tiny
        full = ref.expand(3, -1, -1, -1)
    one, each = model.certify_2afc(ref, x0, x1), model.certify_2afc(full, x0, x1)
    # the same answers; float32 convolutions of a batch of 7 and of 9 images may differ in the last
    # bits (the kernel choice depends on the batch size and the CPU), hence the tolerances
    for name in ("closer", "d0", "d1", "radius"):
        a, b = np.asarray(getattr(one, name)), np.asarray(getattr(each, name))
        assert a.shape == (3,), name
        if name == "closer":
            assert np.array_equal(a, b)
        else:
            assert np.allclose(a, b, rtol=1e-4, atol=1e-6), name
    with pytest.raises(ValueError, match="ref that size or 1"):
        model.certify_2afc(full[:2], x0, x1)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_models_follow_the_umask(mask, tiny, tmp_path):
    old = os.umask(mask)
    try:
        tiny.save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~mask
