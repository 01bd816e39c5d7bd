"""The metric and its certificates: formulas, soundness against attacks, precision, input checks."""

import math

import pytest
import torch

import lipsim
from lipsim import certify
from lipsim.verify import jacobian_spectral_norm


def test_embeddings_are_unit_norm_with_appended_constant(tiny, images):
    g = tiny.embed(images)
    assert g.shape == (4, tiny.backbone.out_dim + 1)
    assert torch.allclose(g.norm(dim=1), torch.ones(4), atol=1e-6)
    f = tiny.features(images)
    assert torch.allclose(g[:, -1], 1 / torch.sqrt(f.square().sum(1) + 1), atol=1e-6)


def test_distance_properties(tiny, images):
    x, y = images[:2], images[2:]
    d = tiny(x, y)
    gx, gy = tiny.embed(x), tiny.embed(y)
    assert torch.allclose(d, 0.5 * (gx - gy).square().sum(1), atol=1e-6)
    assert torch.allclose(d, tiny(y, x), atol=1e-7)
    assert (d >= 0).all() and (d <= 2).all()
    assert torch.allclose(tiny(x, x), torch.zeros(2), atol=1e-6)
    assert torch.allclose(tiny(x[:1], y), tiny(x[:1].expand(2, -1, -1, -1), y), atol=1e-6)


def test_distance_is_differentiable_without_nan_at_zero(tiny, images):
    x = images[:1].clone().requires_grad_(True)
    d = tiny(x, images[:1])
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_certificate_formula_and_decision(tiny, images):
    ref, x0, x1 = images[:1].expand(3, -1, -1, -1), images[1:], images[[2, 3, 1]]
    cert = tiny.certify_2afc(ref, x0, x1)
    g0, g1 = tiny.embed(x0), tiny.embed(x1)
    d0, d1 = tiny(ref, x0), tiny(ref, x1)
    assert torch.allclose(cert.d0, d0, atol=1e-6) and torch.allclose(cert.d1, d1, atol=1e-6)
    expected_closer = torch.where(d0 < d1, 0, 1)
    assert torch.equal(cert.closer, expected_closer)
    # the radius is ρ⁻¹(m/B) for the norm-aware ρ at r = ‖f(ref)‖ (docs/method.md §4.2): at least
    # m/B, the radius of the plain 1-Lipschitz argument, and exactly the inverse of ρ
    naive = ((d0 - d1).abs() / (g0 - g1).norm(dim=1)).detach()
    ref_norm = tiny.features(ref).norm(dim=1).detach()
    tolerance = (1e-5 + 1e-6) / (g0 - g1).norm(dim=1).detach()
    assert (cert.radius >= naive - tolerance).all()
    expected = certify.inverse_movement(naive.double(), ref_norm.double(), embedding="append")
    low = certify.inverse_movement(
        (naive - tolerance).clamp_min(0).double(), ref_norm.double(), embedding="append"
    )
    assert (cert.radius.double() <= expected + 1e-7).all() and (cert.radius.double() >= low - 1e-7).all()
    assert (cert.radius > 2 * naive).all()  # this tiny model's features are far from 0


def test_ties_get_radius_zero(tiny, images):
    cert = tiny.certify_2afc(images[:2], images[2:], images[2:])
    assert torch.equal(cert.closer, torch.tensor([-1, -1]))
    assert torch.equal(cert.radius, torch.zeros(2))


def _pgd_flip(model, ref, x0, x1, closer, eps, steps=60):
    """ℓ2 PGD on the reference that pushes the 2AFC margin towards the other answer."""
    g0, g1 = model.embed(x0).detach(), model.embed(x1).detach()
    sign = torch.where(closer == 0, 1.0, -1.0)  # margin d1 - d0 > 0 when x0 is closer
    delta = torch.randn_like(ref)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * 0.5
    for _ in range(steps):
        delta.requires_grad_(True)
        g = model.embed((ref + delta).clamp(0, 1))
        margin = sign * ((g * g0).sum(1) - (g * g1).sum(1))
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta - 0.25 * eps * step
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
            delta = (ref + delta).clamp(0, 1) - ref
    with torch.no_grad():
        return model.certify_2afc((ref + delta).clamp(0, 1), x0, x1).closer, delta


@pytest.mark.parametrize("arch", ["tiny", "tiny-s2d"])
def test_pgd_inside_the_radius_never_flips_the_decision(arch):
    model = lipsim.create_model(arch, seed=4)
    gen = torch.Generator().manual_seed(5)
    ref = torch.rand(6, 3, 224, 224, generator=gen)
    x0 = (ref + 0.3 * torch.rand(6, 3, 224, 224, generator=gen)).clamp(0, 1)
    x1 = torch.rand(6, 3, 224, 224, generator=gen)
    cert = model.certify_2afc(ref, x0, x1)
    assert (cert.radius > 0).all()
    flipped, delta = _pgd_flip(model, ref, x0, x1, cert.closer, cert.radius.view(-1, 1, 1, 1) * 0.999)
    assert (delta.flatten(1).norm(dim=1) < cert.radius).all()
    assert torch.equal(flipped, cert.closer)


def test_attack_beyond_a_loose_budget_does_flip_something():
    """The attack used above is strong enough to flip decisions when allowed to (a check that can fail)."""
    model = lipsim.create_model("tiny", seed=4)
    gen = torch.Generator().manual_seed(5)
    ref = torch.rand(6, 3, 224, 224, generator=gen)
    x0 = (ref + 0.3 * torch.rand(6, 3, 224, 224, generator=gen)).clamp(0, 1)
    x1 = torch.rand(6, 3, 224, 224, generator=gen)
    cert = model.certify_2afc(ref, x0, x1)
    flipped, _ = _pgd_flip(model, ref, x0, x1, cert.closer, 50.0, steps=80)
    assert not torch.equal(flipped, cert.closer)


def test_power_iteration_never_exceeds_one_for_append_embedding():
    for arch, seed in (("tiny", 0), ("tiny-s2d", 1)):
        model = lipsim.create_model(arch, seed=seed)
        x = torch.rand(3, 3, 224, 224)
        dark = x * 0.01
        for probe in (x, dark):
            est = jacobian_spectral_norm(model.embed, probe, iters=25)
            assert (est <= 1 + 1e-4).all(), est


def test_plain_normalisation_can_exceed_one_which_is_why_its_radius_differs():
    model = lipsim.create_model("tiny", embedding="plain", seed=0)
    with torch.no_grad():  # shrink f so that |f| < 1: plain normalisation then expands distances
        for p in model.backbone.parameters():
            p.zero_()
    x = torch.rand(2, 3, 224, 224) * 0.001
    est = jacobian_spectral_norm(model.embed, x, iters=30)
    assert (est > 1.5).all()


def test_plain_radius_is_sound_and_never_optimistic():
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(200, generator=gen, dtype=torch.float64) * 0.5 + 1e-3
    b = torch.rand(200, generator=gen, dtype=torch.float64) * 1.5 + 0.05
    r = torch.rand(200, generator=gen, dtype=torch.float64) * 3 + 0.05
    d0, d1 = torch.zeros_like(m), m
    g0 = torch.zeros(200, 2, dtype=torch.float64)
    g1 = torch.stack([b, torch.zeros_like(b)], dim=1)
    radius = certify.radius_2afc_plain(d0, d1, g0, g1, r).double()
    assert (radius <= m / b + 1e-9).all()
    # at the radius the worst-case movement bound times B stays below the margin
    rho = certify.movement_bound(radius.clamp_min(0) * (1 - 1e-6), r)
    assert (b * rho <= m + 1e-9).all()
    big = r > 1 + m / b + 1e-3  # |f| stays ≥ 1 on the ball: the projection argument gives m/B
    assert torch.allclose(radius[big], ((m - certify.FLOAT_SLACK) / (b * (1 + 1e-6)))[big], rtol=1e-5)


def test_plain_model_radius_not_larger_than_published_formula(images):
    model = lipsim.create_model("tiny", embedding="plain", seed=2)
    ref, x0, x1 = images[:2], images[2:], images[[1, 0]]
    cert = model.certify_2afc(ref, x0, x1)
    g0, g1 = model.embed(x0), model.embed(x1)
    optimistic = (cert.d0 - cert.d1).abs() / (g0 - g1).norm(dim=1)
    assert (cert.radius <= optimistic + 1e-7).all()


def test_distance_interval_contains_attacked_distances():
    model = lipsim.create_model("tiny", seed=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 224, 224, generator=gen)
    y = (x + 0.2 * torch.randn(3, 3, 224, 224, generator=gen)).clamp(0, 1)
    eps = 0.5
    lo, hi = model.distance_interval(x, y, eps)
    d = model(x, y).detach()
    assert (lo <= d).all() and (d <= hi).all()
    assert (hi - lo < 2 * eps).all()  # tighter than d ± eps
    for direction in (1.0, -1.0):  # push the distance up, then down
        delta = torch.zeros_like(x)
        for _ in range(40):
            delta.requires_grad_(True)
            out = direction * model((x + delta).clamp(0, 1), y).sum()
            (grad,) = torch.autograd.grad(out, delta)
            with torch.no_grad():
                delta = delta + 0.2 * eps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(
                    -1, 1, 1, 1
                )
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
        with torch.no_grad():
            moved = model((x + delta).clamp(0, 1), y)
        assert (lo <= moved).all() and (moved <= hi).all()


@pytest.mark.parametrize("zero", ["x", "y"])
def test_plain_mode_interval_holds_when_a_feature_vector_is_zero(zero):
    """Plain mode: f = 0 normalises to g = 0 and d = 1, where d = ½‖g(x) - g(y)‖² fails; with
    f(y) = 0 every d(x + δ, y) is exactly 1 (the interval used to be [0.49999, 0.50001])."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(3, 16, generator=gen)
    fx, fy = (torch.zeros_like(f), f) if zero == "x" else (f, torch.zeros_like(f))
    for eps in (0.0, 0.1, 1.0):
        d, lo, hi = certify.interval_from_features(fx, fy, eps, "plain")
        assert torch.allclose(d, torch.ones(3))
        assert (lo <= d).all() and (d <= hi).all()
    if zero == "y":
        assert (hi - lo <= 3e-5).all()  # d(x + δ, y) = 1 for every δ
        fx_moved = fx + 0.3 * torch.randn(3, 16, generator=gen)
        d_moved, _, _ = certify.interval_from_features(fx_moved, fy, 0.0, "plain")
        assert ((lo <= d_moved) & (d_moved <= hi)).all()


@pytest.mark.parametrize("eps", [float("nan"), -0.1])
def test_nan_or_negative_eps_is_refused(tiny, images, eps):
    with pytest.raises(ValueError, match="non-negative number"):
        tiny.distance_with_interval(images[:1], images[1:2], eps)
    with pytest.raises(ValueError, match="non-negative number"):
        certify.distance_interval(torch.tensor([0.1]), eps)


def test_non_finite_features_are_an_error_not_a_nan_answer(tiny, images, monkeypatch):
    from lipsim.errors import LipSimError

    monkeypatch.setattr(tiny.backbone, "forward", lambda x: torch.full((x.shape[0], 64), float("inf")))
    with pytest.raises(LipSimError, match="non-finite features"):
        tiny(images[:1], images[1:2])
    with pytest.raises(ValueError, match="non-finite features"):
        certify.certificate_from_features(*torch.full((3, 1, 8), float("nan")), "append")


def test_bad_argument_types_are_value_errors(tiny, images):
    with pytest.raises(ValueError, match="image batch tensor"):
        tiny.certify_2afc(torch.tensor(0.5), images[:1], images[:1])
    with pytest.raises(ValueError, match="image batch tensor"):
        tiny.distance_with_interval([images[:1]], images[:1], 0.1)
    with pytest.raises(ValueError, match="non-negative number"):
        tiny.distance_with_interval(images[:1], images[:1], "0.1")


def test_an_architecture_without_parameters_runs():
    from lipsim.spec import ArchConfig

    config = ArchConfig("pads", "published", out_dim=4, depth=0, channels=4, depth_linear=0, n_features=8)
    model = lipsim.LipSim.from_config(config)
    assert model.device == torch.device("cpu")
    x = torch.rand(2, 3, 224, 224)
    assert model(x, x).shape == (2,)


def test_interval_formula_tight_for_small_distances():
    d = torch.tensor([0.0, 0.005])
    lo, hi = certify.distance_interval(d, 0.1, s=torch.sqrt(2 * d))
    assert hi[0] <= 0.5 * 0.1**2 + 2e-5  # d(x, x+δ) ≤ ½ε²
    s = math.sqrt(0.01)
    assert abs(hi[1] - 0.5 * (s + 0.1) ** 2) < 2e-5 and hi[1] < 0.005 + 0.1


def test_certified_outputs_are_float32_under_autocast(tiny, images):
    plain = tiny.certify_2afc(images[:2], images[2:], images[[1, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = tiny.embed(images)
        cert = tiny.certify_2afc(images[:2], images[2:], images[[1, 0]])
        d = tiny(images[:2], images[2:])
    assert g.dtype == torch.float32 and d.dtype == torch.float32
    assert torch.equal(cert.radius, plain.radius)
    assert torch.equal(cert.closer, plain.closer)


def test_reduced_precision_path_is_separate(tiny, images):
    fast = tiny.embed_fast(images)
    exact = tiny.embed(images)
    assert fast.shape == exact.shape
    assert torch.allclose(fast, exact, atol=5e-2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 224, 224), "shape"),
        (torch.rand(1, 1, 224, 224), "channels"),
        (torch.rand(1, 3, 224, 224) * 2 - 1, r"\[0, 1\]"),
        (torch.full((1, 3, 224, 224), float("nan")), "NaN"),
        (torch.rand(1, 3, 64, 64), "224x224"),
        (torch.randint(0, 255, (1, 3, 224, 224)), "floating"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(tiny, bad, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny.embed(bad)
    assert "\n" not in str(info.value)
