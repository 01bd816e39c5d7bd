"""Architectures: the published configurations exactly (parameter counts are oracles)."""

import pytest
import torch

import lipsim
from lipsim.archs import ArchConfig, build_backbone, get_config, list_archs
from lipsim.layers import LipschitzModule

PUBLISHED_COUNTS = {  # docs/method.md §2.5 states small's; the others follow from the layer shapes
    "small": 63_276_796,
    "medium": 240_967_060,
    "large": 361_511_160,
    "xlarge": 722_974_540,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
    with torch.device("meta"):
        backbone = build_backbone(name)
    assert sum(p.numel() for p in backbone.parameters()) == PUBLISHED_COUNTS[name]


def test_small_state_dict_layout_matches_published_keys():
    with torch.device("meta"):
        state = build_backbone("small").state_dict()
    assert len(state) == 81
    assert state["convs.0.kernel"].shape == (5, 45, 3, 3)
    assert state["convs.19.bias"].shape == (1, 5, 1, 1)
    assert state["convs.19.q"].shape == (5,)
    assert state["linear.1.weight"].shape == (1024, 8820)
    assert state["linear.7.bias"].shape == (1, 1024)
    assert state["linear.7.q"].shape == (1024,)
    assert "linear.0.weight" not in state and "convs.20.kernel" not in state


def test_small_forward_shape_on_real_sized_images():
    model = lipsim.create_model("small", seed=0)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        f = model.features(x)
        g = model.embed(x)
    assert f.shape == (2, 1792)
    assert g.shape == (2, 1793)
    assert torch.allclose(g.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-s2d", "s2d-lite", "s2d-compact", "s2d-small"])
def test_every_leaf_declares_a_bound(name):
    backbone = build_backbone(name)
    for _, layer in backbone.lipschitz_layers():
        assert isinstance(layer, LipschitzModule)
        assert layer.lipschitz_bound <= 1.0


def test_config_json_round_trip():
    for name in list_archs():
        cfg = get_config(name)
        assert ArchConfig.from_json(cfg.to_json()) == cfg


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture"):
        lipsim.create_model("gigantic")


def test_s2d_stem_is_an_isometry_of_the_input():
    backbone = build_backbone("tiny-s2d")
    x, y = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224)
    a, b = backbone.stem(x), backbone.stem(y)
    assert a.shape == (2, 48, 56, 56)
    assert torch.allclose((a - b).flatten(1).norm(dim=1), (x - y).flatten(1).norm(dim=1))


@pytest.mark.parametrize("name", ["s2d-lite", "s2d-compact"])
def test_default_candidates_fit_size_budget(name):
    import dataclasses

    config = dataclasses.replace(get_config(name), out_dim=2712)  # the offline-ensemble teacher's size
    with torch.device("meta"):
        n = sum(p.numel() for p in build_backbone(config).parameters())
    assert n * 4 <= 40 * 1024 * 1024
