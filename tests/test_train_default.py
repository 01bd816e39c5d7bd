"""scripts/train_default.py runs as written: steps pool..evaluate on a tiny fake corpus, then resumes.

The ``corpus`` step downloads Debian packages, so the test builds a corpus with the same layout
(``manifest.json``, ``train/{photos,cutouts,textures}``, ``heldout/photos``) from smooth random
images, and uses a 16-dimensional fake teacher (``--teacher py:module:factory``) with ``--arch tiny``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAKE_TEACHER, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_default.py"


def _smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(low).resize(size, Image.BICUBIC)


def _fake_corpus(corpus: Path, seed: int = 0) -> None:
    """The layout of scripts/build_corpus.py, from a handful of small smooth images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("heldout", 3)):
        folder = corpus / split / "photos"
        folder.mkdir(parents=True)
        for i in range(n):
            _smooth_image(rng, (96, 80)).save(folder / f"{split}_{i}.jpg", quality=90)
    cutouts, textures = corpus / "train" / "cutouts", corpus / "train" / "textures"
    cutouts.mkdir()
    textures.mkdir()
    for i in range(2):
        stamp = _smooth_image(rng, (48, 40)).convert("RGBA")
        alpha = Image.new("L", stamp.size, 0)
        alpha.paste(255, (8, 8, 40, 32))
        stamp.putalpha(alpha)
        stamp.save(cutouts / f"cutout_{i}.png")
        _smooth_image(rng, (64, 64)).save(textures / f"texture_{i}.jpg", quality=90)
    (corpus / "manifest.json").write_text(json.dumps({"fake": True, "files": [], "skipped": []}))


def _run(args: list[str], env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_train_default_steps_pool_to_evaluate_run_and_resume(tmp_path):
    work, runs, teacher_dir = tmp_path / "data", tmp_path / "runs", tmp_path / "teacher"
    _fake_corpus(work / "corpus")
    teacher_dir.mkdir()
    (teacher_dir / "train_default_fake_teacher.py").write_text(FAKE_TEACHER)
    env = subprocess_env(teacher_dir, HF_HUB_OFFLINE="1")
    args = [
        "--work", str(work),
        "--runs", str(runs),
        "--steps", "pool,cache,distill,synth,finetune,evaluate",
        "--arch", "tiny",
        "--teacher", "py:train_default_fake_teacher:build",
        "--pool-size", "16",
        "--distill-steps", "2",
        "--distill-batch-size", "8",
        "--train-triplets", "16",
        "--heldout-triplets", "8",
        "--margins", "0.05",
        "--batch-size", "8",
    ]  # fmt: skip

    out = _run(args, env)
    assert (work / "pool" / "pool.json").exists()
    assert len(list((work / "pool").glob("*.jpg"))) == 16
    cache = work / "pool_cache_py_train_default_fake_teacher_build"
    assert (cache / "meta.json").exists()
    assert (runs / "distill" / "model.safetensors").exists()
    assert (work / "synth_train" / "data.csv").exists()
    assert (work / "synth_heldout" / "data.csv").exists()
    assert (runs / "finetune_m0.05" / "model.safetensors").exists()
    for label in ("distill", "m0.05"):
        result = json.loads((runs / f"eval_{label}" / "results.json").read_text())
        assert result["n"] == 8
        assert 0.0 <= result["natural_2afc"] <= 1.0
        assert all(0.0 <= c["score"] <= 1.0 for c in result["certified"])
        assert f"{label:>10}: natural" in out

    import lipsim

    model = lipsim.load(runs / "finetune_m0.05" / "model.safetensors")
    assert model.config.name == "tiny"

    # every output exists: the second invocation runs no command and builds no cache
    again = _run(args, env)
    assert "$ " not in again and "building the" not in again, again
    assert "     m0.05: natural" in again
