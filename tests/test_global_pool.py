"""Global 1-Lipschitz pooling heads (issue 16): bounds, gradients, and every interpreter of the plan."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import lipsim
from lipsim.archs import build_backbone, get_config
from lipsim.layers import LipschitzModule
from lipsim.numpy_engine import NumpyLipSim
from lipsim.pooling import GlobalPool, safe_sqrt
from lipsim.spec import expected_state, layer_plan
from lipsim.verify import jacobian_spectral_norm, verify_model

MODES = GlobalPool.MODES


def _randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _pool_config(mode):
    return dataclasses.replace(get_config("tiny-s2d-pool"), name=f"tiny-{mode}", head=mode)


@pytest.mark.parametrize("mode", MODES)
def test_pooling_is_1_lipschitz_by_power_iteration(mode):
    layer = GlobalPool(mode)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, 7, generator=gen, dtype=torch.float64)
    x[0] = 1.0 + 1e-3 * x[0]  # nearly constant channels: where sum and norm point the same way
    est = jacobian_spectral_norm(layer, x, iters=50)
    assert (est <= 1.0 + 1e-9).all(), est
    # and the bound is tight: some input reaches it
    assert est.max() >= 0.99


@pytest.mark.parametrize("mode", MODES)
def test_pooling_never_expands_random_differences(mode):
    layer = GlobalPool(mode)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(64, 3, 5, 5, generator=gen, dtype=torch.float64)
    step = torch.randn(64, 3, 5, 5, generator=gen, dtype=torch.float64)
    b = a + step * torch.rand(64, 1, 1, 1, generator=gen, dtype=torch.float64)
    ratio = (layer(a) - layer(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert (ratio <= 1.0 + 1e-12).all()


def test_sum_norm_needs_its_root_two():
    """Without the 1/√2 the concatenation is √2-Lipschitz at a constant channel: the power
    iteration above would see it (this pins down that the factor is needed, not decorative)."""
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    est = jacobian_spectral_norm(lambda t: GlobalPool("sum_norm")(t) * math.sqrt(2), x, iters=30)
    assert est[0] > 1.4


def test_sum_std_features_are_sum_and_centred_norm():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = GlobalPool("sum_std")(x)
    flat = x.flatten(2)
    assert torch.allclose(out[:, :3], flat.sum(-1) / 4)
    assert torch.allclose(out[:, 3:], (flat - flat.mean(-1, keepdim=True)).norm(dim=-1))
    # it carries the per-channel energy of sum_norm exactly: ‖x_c‖² = (Σ/√n)² + ‖x_c - m_c‖²
    assert torch.allclose(out[:, :3] ** 2 + out[:, 3:] ** 2, flat.square().sum(-1))


@pytest.mark.parametrize("mode", ["norm", "sum_norm", "sum_std"])
def test_gradients_are_finite_at_zero_and_constant_maps(mode):
    for x in (torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.7)):
        x = x.clone().requires_grad_(True)
        GlobalPool(mode)(x).sum().backward()
        assert torch.isfinite(x.grad).all()
    s = torch.tensor([0.0, 4.0], requires_grad=True)
    out = safe_sqrt(s)
    out.sum().backward()
    assert out.tolist() == [0.0, 2.0] and s.grad.tolist() == [0.0, 0.25]


def test_pooling_ignores_flips_and_circular_shifts():
    x = torch.rand(2, 4, 8, 8)
    for mode in MODES:
        layer = GlobalPool(mode)
        if mode == "sum_std_grid":  # the quadrant sums see layout: a flip swaps left and right
            assert not torch.allclose(layer(x), layer(x.flip(-1)), atol=1e-6)
            continue
        assert torch.allclose(layer(x), layer(x.flip(-1)), atol=1e-6)
        assert torch.allclose(layer(x), layer(x.roll(3, dims=-1)), atol=1e-6)


def test_sum_std_grid_is_sum_std_and_quadrant_sums_over_root_two():
    x = torch.rand(2, 3, 7, 6)  # odd height: quadrants of 3 and 4 rows
    out = GlobalPool("sum_std_grid")(x)
    assert out.shape == (2, 18)
    base = GlobalPool("sum_std")(x)
    assert torch.allclose(out[:, :6] * math.sqrt(2), base, atol=1e-6)
    top_left = x[:, :, :3, :3].sum(dim=(2, 3)) / 3.0
    bottom_right = x[:, :, 3:, 3:].sum(dim=(2, 3)) / math.sqrt(12)
    assert torch.allclose(out[:, 6:9] * math.sqrt(2), top_left, atol=1e-6)
    assert torch.allclose(out[:, 15:18] * math.sqrt(2), bottom_right, atol=1e-6)


def test_bad_mode_and_shape_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown global pooling mode"):
        GlobalPool("max")
    with pytest.raises(ValueError, match="needs a"):
        GlobalPool("sum")(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown head"):
        dataclasses.replace(get_config("tiny-s2d"), head="max")
    with pytest.raises(ValueError, match="s2d family only"):
        dataclasses.replace(get_config("tiny"), head="sum")


def test_plan_and_sizes_of_the_pooled_architectures():
    plan = dict(layer_plan("s2d-lite-pool"))
    assert [s.kind for s in plan["head"]] == ["global_pool"]
    assert plan["head"][0].args == ("sum_std",)
    assert get_config("s2d-lite-pool").out_dim == 384
    plan = dict(layer_plan("s2d-lite-pool-distill"))
    assert [s.kind for s in plan["head"]] == ["global_pool", "zero_pad", "sll_linear", "sll_linear"]
    cfg = get_config("s2d-lite-pool-distill")
    assert cfg.flat_dim() == 384 and cfg.feature_width() == 2712
    with torch.device("meta"):
        n_plain = sum(p.numel() for p in build_backbone("s2d-lite-pool").parameters())
        backbone = build_backbone("s2d-lite-pool-distill")
        n = sum(p.numel() for p in backbone.parameters())
    assert n_plain == 242_272  # s2d-lite's trunk: 3 × 6,944 + 4 × 55,360
    assert n == 3_021_408  # the trunk + two SLL linear layers 2 × 1,389,568
    assert n * 4 <= 40 * 1024 * 1024
    # the trunk's parameters are s2d-lite's, so a packaged s2d-lite trunk can seed it
    lite = expected_state("s2d-lite")
    pooled = expected_state("s2d-lite-pool-distill")
    assert {k: v for k, v in lite.items() if k.startswith("stage")} == {
        k: v for k, v in pooled.items() if k.startswith("stage")
    }
    for _, layer in backbone.lipschitz_layers():
        assert isinstance(layer, LipschitzModule) and layer.lipschitz_bound <= 1.0
    # the grid default keeps its metadata byte for byte (no "head" field)
    assert '"head"' not in get_config("s2d-lite").to_json()
    assert get_config("s2d-lite-pool").from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("mode", MODES)
def test_numpy_engine_and_fast_path_compute_the_torch_function(mode):
    model = _randomise(lipsim.LipSim.from_config(_pool_config(mode)), seed=3).eval().requires_grad_(False)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = model.backbone(x)  # the layers themselves
    state = {k: v.numpy() for k, v in model.backbone.state_dict().items()}
    f_np = NumpyLipSim(model.config, state, embedding=model.embedding).features(x.numpy())
    assert np.abs(f_np - f.numpy()).max() / np.abs(f.numpy()).max() <= 1e-5
    quick = model.freeze()
    assert quick.frozen
    with torch.no_grad():
        fq = quick.features(x)
    assert ((fq - f).abs().max() / f.abs().max()).item() <= 1e-5


def test_verify_passes_and_estimates_the_pooling_layer():
    model = _randomise(lipsim.create_model("tiny-s2d-pool", seed=0), seed=4)
    report = verify_model(model, n_random=1, iters=6)
    assert report.passed
    pool = [layer for layer in report.layers if layer.kind == "GlobalPool"]
    assert len(pool) == 1 and pool[0].estimate is not None and pool[0].estimate <= 1.0 + 1e-4


def test_training_through_the_pooled_head_gives_finite_gradients():
    model = lipsim.create_model("tiny-s2d-pool", seed=0).train()
    x = torch.full((2, 3, 224, 224), 0.5)  # centred to exactly zero: every norm is at 0
    loss = model.features(x).square().sum() + model.features(torch.rand(2, 3, 224, 224)).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
