"""The hard held-out evaluation (lipsim.evaluate.hard): what its families hold, and its scores."""

import numpy as np
import pytest
import torch
from PIL import Image

import lipsim
from lipsim.evaluate import hard


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        # smooth random photos of different aspect ratios (one square: the long side is grown)
        h, w = (240, 400) if i < 2 else (300, 300)
        small = rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(root / f"p{i}.png")
    return hard.build_hard_set(root, refs_per_photo=2, n_candidates=5, seed=0)


def test_families_hold_what_they_promise(hard_set):
    hs = hard_set
    assert len(hs) == 3 * 2 * len(hard.FAMILIES) and hs.family[:4] == list(hard.FAMILIES)
    assert hs.ref.shape[1:] == (3, 224, 224) and hs.ladder.shape == (3, len(hard.LADDER), 3, 224, 224)
    fam = np.array(hs.family)
    ref, x0, x1 = hs.ref, hs.x0, hs.x1
    for i in np.flatnonzero(fam == "same-scene"):
        # the right answer overlaps the reference by half a crop
        half = hard.HALF
        assert torch.equal(ref[i][:, :, half:], x0[i][:, :, :half]) or torch.equal(
            ref[i][:, half:], x0[i][:, :half]
        )
    for i in np.flatnonzero(fam == "mirror"):
        assert torch.equal(x0[i], ref[i].flip(-1))
    for i in np.flatnonzero(fam == "translation"):
        shift = (x0[i] - ref[i]).norm()
        noise = (x1[i] - ref[i]).norm()
        assert noise <= 0.5 * shift + 1e-4  # clamping can only shrink the noise
        assert noise >= 0.3 * shift
    # same-scene and mirror share their negative: the other photos' crop nearest in pixels
    neg = fam == "same-scene"
    assert torch.equal(x1[neg], x1[fam == "mirror"])


def test_spearman_against_a_hand_example():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert hard._spearman(a, a * 10) == pytest.approx(1.0)
    assert hard._spearman(a, -a) == pytest.approx(-1.0)
    assert hard._spearman(a, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def test_scores_of_a_model_and_the_pixel_baseline(hard_set):
    model = lipsim.create_model("tiny-s2d-pool", seed=0)
    r = hard.evaluate_model(model, hard_set, teacher=None, attack_per_family=1, attack_steps=2)
    assert r["families"]["translation"]["pixel_l2"] == 0.0  # noise of half the ℓ2 always wins in pixels
    for e in [r["all"], *r["families"].values()]:
        assert 0.0 <= e["certified_36"] <= e["ours"] <= 1.0
    assert 0.0 <= r["retrieval_top1"] <= 1.0
    a = r["attack"]
    assert a["n"] == len(hard.FAMILIES) and a["violations"] == 0
    assert a["attacked_2afc"] <= a["natural_2afc"]
    text = hard.markdown("tiny", r)
    assert "| translation |" in text and "APGD-CE" in text
