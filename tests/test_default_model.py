"""The packaged default model: loads offline, is 1-Lipschitz, and behaves perceptually on bundled photos."""

from importlib import resources

import pytest
import torch

import lipsim
from lipsim.checkpoints import default_model_path
from lipsim.verify import verify_model

pytestmark = pytest.mark.skipif(not default_model_path().exists(), reason="no packaged default model")


@pytest.fixture(scope="module")
def model():
    return lipsim.load()


@pytest.fixture(scope="module")
def photos():
    assets = resources.files("lipsim") / "assets"
    return {name: lipsim.load_image(str(assets / f"{name}.jpg")) for name in ("cat_a", "cat_b", "coffee")}


def test_default_model_is_small_and_appends_the_constant(model):
    assert default_model_path().stat().st_size <= 40 * 1024 * 1024
    assert model.embedding == "append"
    assert not model.training


def test_default_model_passes_lipschitz_verification(model, photos):
    report = verify_model(model, images=torch.cat([photos["cat_a"], photos["coffee"]]), iters=15)
    assert report.passed, report.as_dict()


def test_default_model_prefers_the_same_scene_with_a_certificate(model, photos):
    cert = model.certify_2afc(photos["cat_a"], photos["cat_b"], photos["coffee"])
    assert int(cert.closer) == 0
    assert float(cert.radius) > 0


def test_default_model_prefers_a_mirror_and_a_weak_blur(model, photos):
    cat = photos["cat_a"]
    mirrored = cat.flip(-1)
    assert int(model.certify_2afc(cat, mirrored, photos["coffee"]).closer) == 0
    weak = torch.nn.functional.avg_pool2d(cat, 3, stride=1, padding=1, count_include_pad=False)
    strong = torch.nn.functional.avg_pool2d(cat, 9, stride=1, padding=4, count_include_pad=False)
    assert int(model.certify_2afc(cat, weak, strong).closer) == 0


def test_default_model_is_the_pooled_v3_and_prefers_a_shift_to_noise(model, photos):
    """v3 (issue 16): the global pooling head; a 3-px translation of a photo is closer than noise
    of half the translation's ℓ2 norm (pixel ℓ2 says the opposite by construction)."""
    assert model.config.name == "s2d-lite-pool" and model.config.head == "sum_std"
    cat = photos["cat_a"]
    shifted = torch.nn.functional.pad(cat[..., :-3], (3, 0, 0, 0), mode="replicate")
    noise = torch.randn(cat.shape, generator=torch.Generator().manual_seed(0))
    noisy = (cat + noise * (0.5 * (shifted - cat).norm() / noise.norm())).clamp(0, 1)
    assert (noisy - cat).norm() < (shifted - cat).norm()
    assert int(model.certify_2afc(cat, shifted, noisy).closer) == 0
