"""lipsim.certify as pure functions, checked against brute force on small cases.

The certificates only assume that the backbone f is 1-Lipschitz, so under ‖δ‖ ≤ ε the features
of x + δ can be any point of the ball of radius ε around f(x). The tests sample (and, for a
non-linear f, attack) that ball in a few dimensions and check that no reachable point breaks a
certificate; where the geometry makes a bound exact (linear f, a reference at f = 0, a short
movement), they also check that it is not looser than it needs to be, so that scaling a formula
by 1 % in either direction fails a test. Exact cases pin the formulas to hand-computed values.
"""

import math
import warnings

import numpy as np
import pytest
import torch

from lipsim import certify

SLACK = certify.FLOAT_SLACK


def _low(r: float) -> float:
    """The norm the certificates use for a computed ‖f(x)‖ = r (lowered for float32 rounding)."""
    return r * (1 - certify.NORM_SLACK) - SLACK


def _g(f: np.ndarray, embedding: str) -> np.ndarray:
    """g(f) written independently of certify: [f; 1]/‖[f; 1]‖ or f/‖f‖, row-wise, float64."""
    f = np.atleast_2d(np.asarray(f, dtype=np.float64))
    if embedding == "append":
        f = np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _ball(center: np.ndarray, eps: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points of the closed ball of radius eps around center: half on its sphere, half inside."""
    u = rng.standard_normal((n, center.shape[-1]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    radii = np.where(np.arange(n) < n // 2, eps, eps * rng.random(n) ** (1 / center.shape[-1]))
    return center + radii[:, None] * u


def _distance(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    return 1.0 - np.sum(gx * gy, axis=-1)


# -- the movement bound ρ(ε) ≥ ‖g(x + δ) - g(x)‖ ---------------------------------------------


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5, 2.0])
def test_append_movement_bound_covers_every_reachable_embedding(eps):
    rng = np.random.default_rng(0)
    rho = certify.movement_bound(eps).item()
    worst = 0.0
    for f in [np.zeros(3), *rng.standard_normal((6, 3))]:
        moved = _ball(f, eps, 4000, rng)
        worst_here = np.linalg.norm(_g(moved, "append") - _g(f, "append"), axis=1).max()
        assert worst_here <= rho * (1 + 1e-12)
        worst = max(worst, worst_here)
    if eps <= 0.1:  # near f = 0 the radial map barely shrinks a short move: ρ = ε is nearly reached
        assert worst >= 0.995 * rho


@pytest.mark.parametrize("r", [0.3, 1.0, 1.7, 10.0])
@pytest.mark.parametrize("eps", [0.05, 0.25, 1.2])
def test_plain_movement_bound_covers_every_reachable_embedding(r, eps):
    rng = np.random.default_rng(1)
    f = rng.standard_normal(4)
    f *= r / np.linalg.norm(f)
    moved = _ball(f, eps, 6000, rng)
    moved = moved[np.linalg.norm(moved, axis=1) > 0]
    worst = np.linalg.norm(_g(moved, "plain") - _g(f, "plain"), axis=1).max()
    # the exact worst case: the tangent through f(x) turns g by the angle arcsin(ε/r)
    exact = 2 * math.sin(math.asin(eps / r) / 2) if eps < r else 2.0
    assert worst <= exact + 1e-9
    rho = certify.movement_bound(eps, np.array([r])).item()
    assert exact <= rho * (1 + 1e-12)


def test_movement_bound_exact_values():
    r = lambda v: np.array([v])  # noqa: E731
    rho = lambda eps, v: certify.movement_bound(eps, r(v)).item()  # noqa: E731
    # plain mode: ε/√(r'(r' - ε)) with r' = r lowered by the slacks
    assert rho(0.5, 2.0) == pytest.approx(0.5 / math.sqrt(_low(2) * (_low(2) - 0.5)), rel=1e-12)
    assert rho(0.5, 2.0) == pytest.approx(0.288675, rel=1e-4)
    assert rho(0.5, 10.0) == pytest.approx(0.5 / math.sqrt(10 * 9.5), rel=1e-4)
    assert rho(0.9, 1.0) == 2.0  # ρ(ε) = ε/√(r(r-ε)) exceeds 2: the trivial bound
    assert rho(1.0, 1.0) == 2.0 and rho(3.0, 1.0) == 2.0  # ε ≥ r: g may point anywhere
    # append mode: ρ = ε, capped at the diameter 2
    assert certify.movement_bound(0.3).item() == pytest.approx(0.3, rel=1e-15)
    assert certify.movement_bound(5.0).item() == 2.0


@pytest.mark.parametrize("r", [0.0, 0.4, 3.0, 20.0])
@pytest.mark.parametrize("eps", [0.01, 0.14, 0.5, 5.0])
def test_norm_aware_append_bound_covers_every_reachable_embedding(r, eps):
    """Append mode with r = ‖f(x)‖: ρ(ε) = ε/√(max(r - ε, 0)² + 1) ≥ ‖g(x + δ) - g(x)‖, and for a
    short move it is nearly reached (a step across f(x) turns z = [f; 1] by ≈ ε/‖z‖)."""
    rng = np.random.default_rng(11)
    f = rng.standard_normal(3)
    f *= r / np.linalg.norm(f)
    rho = certify.movement_bound(eps, np.array([r]), embedding="append").item()
    assert rho == pytest.approx(min(eps / math.sqrt(max(_low(r) - eps, 0.0) ** 2 + 1), 2.0), rel=1e-12)
    assert rho <= eps  # never worse than the bound without the norm
    moved = _ball(f, eps, 6000, rng)
    worst = np.linalg.norm(_g(moved, "append") - _g(f, "append"), axis=1).max()
    assert worst <= rho * (1 + 1e-12)
    if eps <= 0.14 and r > 0:
        assert worst >= 0.9 * rho


def test_inverse_movement_is_the_largest_eps_within_k():
    for mode in ("append", "plain"):
        for r in (0.05, 0.5, 1.0, 2.5, 20.0):
            for k in (1e-4, 0.01, 0.1, 0.3, 0.99, 1.0, 1.5):
                if mode == "append" and k > 1:
                    continue  # the margin k = m/B never exceeds 1
                eps = certify.inverse_movement(k, np.array([r]), embedding=mode).item()
                assert eps > 0
                rho, rho_more = (
                    certify.movement_bound(e, np.array([r]), embedding=mode).item() for e in (eps, 1.01 * eps)
                )
                assert rho <= k * (1 + 1e-9), (mode, r, k)
                if mode == "append" or eps < k:  # plain mode caps its radius at k (conservative)
                    assert rho_more > k, (mode, r, k)  # 1 % more is too much: it is tight
    # hand-computed: r' = 3, k = 0.2 gives ε = 0.2·10/(√(10 - 0.04) + 0.6) = 0.532487...
    r = (3 + SLACK) / (1 - certify.NORM_SLACK)  # so that the lowered norm is exactly 3
    eps = certify.inverse_movement(0.2, np.array([r]), embedding="append").item()
    assert eps == pytest.approx(2 / (math.sqrt(9.96) + 0.6), rel=1e-12)
    assert eps == pytest.approx(0.532487, rel=1e-5)
    assert eps / math.sqrt((3 - eps) ** 2 + 1) == pytest.approx(0.2, rel=1e-12)
    # no norm: ρ = ε, the inverse is the identity; k ≥ r: the ball may reach f = 0, again ε = k
    assert certify.inverse_movement(0.2).item() == 0.2
    assert certify.inverse_movement(0.5, np.array([0.3]), embedding="append").item() == 0.5
    with pytest.raises(ValueError, match="need ref_norm"):
        certify.inverse_movement(0.2, embedding="plain")
    with warnings.catch_warnings():  # r = 0 and k ≥ 1: no 0/0 warning from the masked branch
        warnings.simplefilter("error")
        assert (
            certify.radius_threshold(np.array([0.0]), 1.9, ref_norm=np.array([0.0]), embedding="append")[0]
            > 0
        )


def test_append_norm_recovered_from_the_embedding_is_a_lower_bound():
    rng = np.random.default_rng(12)
    f = rng.standard_normal((50, 6)) * rng.uniform(0.0, 40.0, size=(50, 1))
    r = np.linalg.norm(f, axis=1)
    g = _g(f, "append").astype(np.float32)  # as model.embed stores them
    rec = certify.append_norm_from_embedding(g)
    assert (rec <= r).all() and np.allclose(rec, r, rtol=1e-4, atol=1e-5)
    for not_append in ([1.0, 0.0, -0.5], [1.0, 0.0, 0.0], [0.6, 0.8, -1e-13]):  # last entry ≤ 0
        assert certify.append_norm_from_embedding(np.array([not_append]))[0] == 0.0
    # so the interval falls back to ρ = ε there
    gx, gy = np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]])
    _, lo, hi = certify.pairwise_from_embeddings(gx, gy, 0.5, embedding="append")
    _, lo_eps, hi_eps = certify.pairwise_from_embeddings(gx, gy, 0.5)
    assert float(lo[0, 0]) == float(lo_eps[0, 0]) and float(hi[0, 0]) == float(hi_eps[0, 0])
    # a scaled copy (unit only to float32 precision) gives the same norm
    assert np.allclose(certify.append_norm_from_embedding(g * 1.00005), rec, rtol=1e-6)


# -- 2AFC radii --------------------------------------------------------------------------------


def _flip_distance_linear(W, b, x, w):
    """Exact smallest ‖δ‖ that flips sign⟨g(x + δ), w⟩ for the append embedding of f(x) = Wx + b.

    The normalisation is a positive scaling, so the sign is that of ⟨[Wx + b; 1], w⟩, which is
    affine in δ with gradient Wᵀw[:k]: the flip distance is the distance to its zero set.
    """
    value = np.concatenate([W @ x + b, [1.0]]) @ w
    return abs(value) / np.linalg.norm(W.T @ w[:-1])


def test_append_radius_is_sound_for_linear_backbones_and_exact_when_the_geometry_allows():
    rng = np.random.default_rng(2)
    k = 3
    checked = 0
    for _ in range(300):
        W = rng.standard_normal((k, k))
        W /= np.linalg.norm(W, 2)  # 1-Lipschitz
        b = rng.standard_normal(k) * 0.5
        x, x0, x1 = rng.standard_normal((3, k))
        g_ref, g0, g1 = (_g(W @ v + b, "append")[0] for v in (x, x0, x1))
        d0, d1 = _distance(g_ref, g0), _distance(g_ref, g1)
        radius = float(certify.radius_2afc(np.array([d0]), np.array([d1]), g0[None], g1[None])[0])
        if radius > 0:
            checked += 1
            assert radius <= _flip_distance_linear(W, b, x, g0 - g1)
    assert checked > 250
    # f = identity, ‖f(x0)‖ = ‖f(x1)‖ (so w = g0 - g1 has w[-1] = 0) and f(x_ref) = t·u on the line
    # through f(x0) - f(x1): the exact flip distance is t·|⟨u, w⟩|/‖w‖ and the certificate m/B is
    # that divided by ‖[f(x_ref); 1]‖ = √(1 + t²), the only loss of the Lipschitz argument here
    for _ in range(50):
        f0, f1 = rng.standard_normal((2, k))
        f1 *= np.linalg.norm(f0) / np.linalg.norm(f1)
        t = rng.uniform(0.05, 0.3)
        f_ref = t * (f0 - f1) / np.linalg.norm(f0 - f1)  # closer to f0
        g_ref, g0, g1 = (_g(v, "append")[0] for v in (f_ref, f0, f1))
        d0, d1 = _distance(g_ref, g0), _distance(g_ref, g1)
        radius = float(certify.radius_2afc(np.array([d0]), np.array([d1]), g0[None], g1[None])[0])
        exact = _flip_distance_linear(np.eye(k), np.zeros(k), f_ref, g0 - g1)
        assert radius <= exact
        expected = exact / math.sqrt(1 + t * t) - SLACK / np.linalg.norm(g0 - g1)
        assert radius == pytest.approx(expected, rel=1e-5)


def test_append_radius_survives_an_attack_on_a_relu_backbone():
    """f(x) = W2·relu(W1·x + b1) with ‖W1‖ = ‖W2‖ = 1: projected gradient steps inside the ball
    of the certified radius never flip the decision."""
    gen = torch.Generator().manual_seed(3)
    k, h, n = 4, 8, 64
    w1 = torch.randn(h, k, generator=gen, dtype=torch.float64)
    w1 /= torch.linalg.matrix_norm(w1, 2)
    w2 = torch.randn(k, h, generator=gen, dtype=torch.float64)
    w2 /= torch.linalg.matrix_norm(w2, 2)
    b1 = torch.randn(h, generator=gen, dtype=torch.float64) * 0.3

    def g(x):
        f = torch.relu(x @ w1.T + b1) @ w2.T
        z = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
        return z / z.norm(dim=1, keepdim=True)

    x, x0, x1 = torch.randn(3, n, k, generator=gen, dtype=torch.float64)
    g_ref, g0, g1 = g(x), g(x0), g(x1)
    d0, d1 = 1 - (g_ref * g0).sum(1), 1 - (g_ref * g1).sum(1)
    radius = certify.radius_2afc(d0, d1, g0, g1).double()
    assert radius.dtype == torch.float64 and (radius > 0).sum() > n // 2
    sign = torch.sign(d1 - d0)  # +1: x0 closer
    delta = torch.randn(n, k, generator=gen, dtype=torch.float64) * 1e-3
    for _ in range(60):
        delta.requires_grad_(True)
        xp = x + delta
        gap = sign * ((1 - (g(xp) * g1).sum(1)) - (1 - (g(xp) * g0).sum(1)))
        (grad,) = torch.autograd.grad(gap.sum(), delta)
        with torch.no_grad():
            delta = delta - 0.2 * radius[:, None] * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            delta *= torch.clamp(radius / delta.norm(dim=1).clamp_min(1e-30), max=1.0)[:, None]
    with torch.no_grad():
        gp = g(x + delta)
        gap = sign * ((1 - (gp * g1).sum(1)) - (1 - (gp * g0).sum(1)))
    assert (gap[radius > 0] > 0).all()


def test_norm_aware_append_radius_is_sound_for_linear_backbones():
    """certificate_from_features (which uses ‖f(x_ref)‖) against the exact flip distance of
    f(x) = Wx + b, with references far from f = 0, where the norm-aware radius is much larger."""
    rng = np.random.default_rng(13)
    k = 3
    gains = []
    for _ in range(400):
        W = rng.standard_normal((k, k))
        W /= np.linalg.norm(W, 2)
        b = rng.standard_normal(k) * rng.uniform(0.0, 8.0)
        x, x0, x1 = rng.standard_normal((3, k))
        f_ref, f0, f1 = (W @ v + b for v in (x, x0, x1))
        cert = certify.certificate_from_features(f_ref[None], f0[None], f1[None], "append")
        radius = float(cert.radius[0])
        if radius > 0:
            g_ref, g0, g1 = (_g(v, "append")[0] for v in (f_ref, f0, f1))
            exact = _flip_distance_linear(W, b, x, g0 - g1)
            assert radius <= exact
            plain_lipschitz = float(certify.radius_2afc(cert.d0, cert.d1, g0[None], g1[None])[0])
            assert radius >= plain_lipschitz * (1 - 1e-6)
            gains.append(radius / plain_lipschitz)
    assert len(gains) > 300
    assert np.median(gains) > 1.5  # the reason for the norm-aware bound


def test_norm_aware_append_radius_survives_an_attack_on_a_relu_backbone():
    """As the attack test above, with features far from 0 and the radius of
    certificate_from_features: PGD inside the certified ball never flips a decision."""
    gen = torch.Generator().manual_seed(14)
    k, h, n = 4, 8, 64
    w1 = torch.randn(h, k, generator=gen, dtype=torch.float64)
    w1 /= torch.linalg.matrix_norm(w1, 2)
    w2 = torch.randn(k, h, generator=gen, dtype=torch.float64)
    w2 /= torch.linalg.matrix_norm(w2, 2)
    b1 = torch.randn(h, generator=gen, dtype=torch.float64) * 0.3
    b2 = torch.randn(k, generator=gen, dtype=torch.float64) * 3.0

    def feats(x):
        return torch.relu(x @ w1.T + b1) @ w2.T + b2

    def g(x):
        f = feats(x)
        z = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
        return z / z.norm(dim=1, keepdim=True)

    x, x0, x1 = torch.randn(3, n, k, generator=gen, dtype=torch.float64) * 2
    cert = certify.certificate_from_features(feats(x), feats(x0), feats(x1), "append")
    radius = cert.radius.double()
    assert (radius > 0).sum() > n // 2
    g0, g1 = g(x0), g(x1)
    sign = torch.where(cert.closer == 0, 1.0, -1.0).double()
    flips_at = []
    for scale in (1.0, 10.0):  # inside the certified ball, then beyond it (the attack must bite)
        budget = radius * scale
        delta = torch.randn(n, k, generator=gen, dtype=torch.float64) * 1e-3
        for _ in range(80):
            delta.requires_grad_(True)
            gp = g(x + delta)
            gap = sign * ((1 - (gp * g1).sum(1)) - (1 - (gp * g0).sum(1)))
            (grad,) = torch.autograd.grad(gap.sum(), delta)
            with torch.no_grad():
                delta = delta - 0.1 * budget[:, None] * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
                delta *= torch.clamp(budget / delta.norm(dim=1).clamp_min(1e-30), max=1.0)[:, None]
        with torch.no_grad():
            gp = g(x + delta)
            gap = sign * ((1 - (gp * g1).sum(1)) - (1 - (gp * g0).sum(1)))
        flips_at.append(int((gap[radius > 0] <= 0).sum()))
    assert flips_at[0] == 0
    assert flips_at[1] > 0  # ten times the radius: the same attack does flip some


def test_plain_radius_is_sound_against_every_reachable_feature():
    """Plain mode: g = f/‖f‖, so the decision flips exactly where the ball around f(x) meets the
    hyperplane ⟨f, g0 - g1⟩ = 0; the certified radius must stay below that distance."""
    rng = np.random.default_rng(4)
    k = 3
    checked = 0
    for _ in range(300):
        f_ref, f0, f1 = rng.standard_normal((3, k)) * rng.uniform(0.1, 3.0, size=(3, 1))
        g_ref, g0, g1 = (_g(v, "plain")[0] for v in (f_ref, f0, f1))
        d0, d1 = _distance(g_ref, g0), _distance(g_ref, g1)
        r = np.array([np.linalg.norm(f_ref)])
        radius = float(certify.radius_2afc_plain(np.array([d0]), np.array([d1]), g0[None], g1[None], r)[0])
        w = g0 - g1
        exact = abs(f_ref @ w) / np.linalg.norm(w)
        assert radius <= exact
        if radius > 0:
            checked += 1
            moved = _ball(f_ref, radius * (1 - 1e-9), 500, rng)
            gm = _g(moved, "plain")
            assert (np.sign(_distance(gm, g1) - _distance(gm, g0)) == np.sign(d1 - d0)).all()
    assert checked > 200


def test_plain_radius_exact_values():
    m, b = 0.2, 0.5  # margin |d0 - d1| and B = ‖g0 - g1‖
    g0, g1 = np.zeros((1, 2)), np.array([[b, 0.0]])
    d0, d1 = np.zeros(1), np.array([m])

    def radius(r):
        return float(certify.radius_2afc_plain(d0, d1, g0, g1, np.array([r]))[0])

    def root(r):  # ε* solving B·ε/√(r(r - ε)) = m, with the slacks the function applies
        mm, bb, rr = m - SLACK, b * (1 + 1e-6), _low(r)
        return rr * mm * (math.sqrt(mm**2 + 4 * bb**2) - mm) / (2 * bb**2)

    # r = 0.8: ‖f‖ may fall below 1, only the norm-aware bound applies
    assert radius(0.8) == pytest.approx(root(0.8), rel=1e-6)
    assert radius(0.8) == pytest.approx(0.8 * 0.2 * (math.sqrt(0.04 + 1) - 0.2) / 0.5, rel=1e-4)
    # r = 1.2: ε ≤ r - 1 = 0.2 keeps ‖f‖ ≥ 1 (ρ = ε, radius ≥ min(m/B, 0.2) = 0.2) but the root is larger
    assert radius(1.2) == pytest.approx(root(1.2), rel=1e-6) and radius(1.2) > 0.2
    # r = 5: the ball stays outside the unit sphere, the append-mode answer m/B (less the slack)
    assert radius(5.0) == pytest.approx((m - SLACK) / (b * (1 + 1e-6)), rel=1e-6)
    # the radius is the largest ε with B·ρ(ε) ≤ m: 1 % more breaks that inequality
    for r in (0.8, 1.2):
        eps = radius(r)
        assert b * certify.movement_bound(eps, np.array([r])).item() <= m
        assert b * certify.movement_bound(1.01 * eps, np.array([r])).item() > m


def test_2afc_radius_exact_values_and_ties():
    g0, g1 = np.array([[0.6, 0.8]]), np.array([[0.8, 0.6]])  # B = 0.2√2
    r = certify.radius_2afc(np.array([0.1]), np.array([0.3]), g0, g1)
    assert r.dtype == np.float32
    assert float(r[0]) == pytest.approx((0.2 - SLACK) / (0.2 * math.sqrt(2) * (1 + 1e-6)), rel=1e-6)
    # within the float slack, or a tie: no certificate
    assert float(certify.radius_2afc(np.array([0.1]), np.array([0.1 + SLACK / 2]), g0, g1)[0]) == 0.0
    assert float(certify.radius_2afc(np.array([0.1]), np.array([0.3]), g0, g0)[0]) == 0.0
    # the decision and its radius from features: x0 is the reference itself
    f = np.array([[0.3, -0.2, 0.1]])
    cert = certify.certificate_from_features(f, f, -f, "append")
    assert int(cert.closer[0]) == 0 and float(cert.d0[0]) == pytest.approx(0.0, abs=1e-7)
    tie = certify.certificate_from_features(np.zeros((1, 3)), f, -f, "append")
    assert int(tie.closer[0]) == -1 and float(tie.radius[0]) == 0.0


# -- distance intervals ------------------------------------------------------------------------


@pytest.mark.parametrize("embedding", ["append", "plain"])
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 1.5])
def test_interval_contains_every_reachable_distance(embedding, eps):
    rng = np.random.default_rng(5)
    k = 3
    fx = rng.standard_normal((12, k)) * rng.uniform(0.05, 8.0, size=(12, 1))
    fy = rng.standard_normal((12, k)) * rng.uniform(0.05, 8.0, size=(12, 1))
    fy[0] = fx[0]  # the same image
    fy[1] = fx[1] + 1e-3  # nearly the same image
    d, lo, hi = certify.interval_from_features(fx, fy, eps, embedding)
    assert d.dtype == lo.dtype == hi.dtype == np.float32
    for i in range(len(fx)):
        moved = _ball(fx[i], eps, 3000, rng) if eps > 0 else fx[i][None]
        reach = _distance(_g(moved, embedding), _g(fy[i], embedding)[0])
        assert lo[i] <= reach.min() + 1e-12 and reach.max() <= hi[i] + 1e-12, (
            i,
            lo[i],
            reach.min(),
            reach.max(),
            hi[i],
        )


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_interval_on_unit_embeddings_contains_every_point_within_rho(eps):
    """The pure formula: for unit g(x), g(y) and every unit g' with ‖g' - g(x)‖ ≤ ρ(ε) = ε,
    ``d(g', g(y))`` lies in distance_interval(d, ε, s=‖g(x) - g(y)‖)."""
    rng = np.random.default_rng(6)
    k = 4
    gx, gy = _g(rng.standard_normal((20, k)), "plain"), _g(rng.standard_normal((20, k)), "plain")
    gy[0] = gx[0]
    d = _distance(gx, gy)
    s = np.linalg.norm(gx - gy, axis=1)
    lo, hi = certify.distance_interval(d, eps, s=s)
    lo_d, hi_d = certify.distance_interval(d, eps)  # s derived from d
    for i in range(len(gx)):
        # unit vectors within ε of gx[i]: normalised points of a small ball, kept if within ε
        cand = _g(_ball(gx[i], eps, 8000, rng), "plain")
        cand = cand[np.linalg.norm(cand - gx[i], axis=1) <= eps]
        reach = _distance(cand, gy[i])
        assert lo[i] <= reach.min() and reach.max() <= hi[i]
        assert lo_d[i] <= reach.min() and reach.max() <= hi_d[i]


def test_interval_exact_values_and_tightness():
    eps = 0.1
    # x = y with f = 0 (append): d(x + δ, y) = 1 - 1/√(1 + ‖δ‖²), at most that at ‖δ‖ = ε
    d, lo, hi = certify.interval_from_features(np.zeros((1, 3)), np.zeros((1, 3)), eps, "append")
    reach = 1 - 1 / math.sqrt(1 + eps**2)
    assert float(lo[0]) == 0.0 and float(d[0]) == 0.0
    assert reach <= float(hi[0]) <= reach * 1.009  # ½(ε + slack)² = 0.0050010 against 0.0049628
    # the formula itself: ½(s ± ρ)², d ± ρ, clipped to [0, 2], with the documented slacks
    s = 0.4
    lo, hi = certify.distance_interval(np.array([0.08]), eps, s=np.array([s]))
    assert float(lo[0]) == pytest.approx(0.5 * (s - 1e-5 - eps) ** 2, rel=1e-6)
    assert float(hi[0]) == pytest.approx(0.5 * (s + 1e-5 + eps) ** 2, rel=1e-6)
    lo, hi = certify.distance_interval(np.array([1.9]), 0.5, s=np.array([math.sqrt(3.8)]))
    assert float(lo[0]) == pytest.approx(0.5 * (math.sqrt(3.8) - 1e-5) ** 2 - 0.5, rel=1e-6)  # d_lo - ρ
    assert float(hi[0]) == 2.0
    lo, hi = certify.distance_interval(np.array([0.3]), 0.0, s=np.array([math.sqrt(0.6)]))
    assert float(lo[0]) <= 0.3 <= float(hi[0]) and float(hi[0] - lo[0]) < 3e-5


# -- threshold radii ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm_aware", [False, True])
@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.5])
def test_threshold_radius_is_sound(threshold, norm_aware):
    """ρ(ε) = ε (no norm), and the norm-aware ρ with ‖f(x)‖ on larger features, never smaller."""
    rng = np.random.default_rng(15 if norm_aware else 7)
    k, scale = 3, (6.0 if norm_aware else 1.5)
    fx = rng.standard_normal((40, k)) * rng.uniform(0.0, scale, size=(40, 1))
    fy = rng.standard_normal((40, k)) * rng.uniform(0.0, scale, size=(40, 1))
    gx, gy = _g(fx, "append"), _g(fy, "append")
    d = _distance(gx, gy)
    radius = certify.radius_threshold(d, threshold)
    assert radius.dtype == np.float32
    if norm_aware:
        aware = certify.radius_threshold(
            d, threshold, ref_norm=np.linalg.norm(fx, axis=1), embedding="append"
        )
        assert (aware >= radius).all()
        radius = aware
    assert (radius > 0).sum() > 20
    for i in np.nonzero(radius > 0)[0]:
        moved = _ball(fx[i], float(radius[i]) * (1 - 1e-7), 2000, rng)
        reach = _distance(_g(moved, "append"), gy[i])
        assert ((reach < threshold) == (d[i] < threshold)).all()


def test_threshold_radius_exact_values():
    T = 0.1
    t = math.sqrt(2 * T)
    radius = lambda d: float(certify.radius_threshold(np.array([d]), T)[0])  # noqa: E731
    # below: max(t - √(2(d + slack)), T - (d + slack))
    assert radius(0.02) == pytest.approx(t - math.sqrt(2 * (0.02 + SLACK)), rel=1e-6)
    # above: max(√(2(d - slack)) - t, d - T)
    assert radius(0.3) == pytest.approx(math.sqrt(2 * (0.3 - SLACK)) - t, rel=1e-6)
    assert radius(1.9) == pytest.approx(1.9 - SLACK - T, rel=1e-6)
    assert radius(T) == 0.0
    # a decision exactly on the slack's edge has no radius
    assert radius(T + SLACK / 2) == 0.0
    with pytest.raises(ValueError, match="append-mode"):
        certify.radius_threshold(np.array([0.1]), T, ref_norm=np.array([1.0]))
    with pytest.raises(ValueError, match=r"\(0, 2\)"):
        certify.radius_threshold(np.array([0.1]), 2.0)


def test_float32_noise_is_inside_the_slack():
    """A margin of 5e-6 (hundreds of float32 ulps at d ≈ 0.1, the size of the rounding error of a
    float32 forward pass) is noise, not a decision: no radius, and a zero-ε interval covers it
    (on s = ‖g(x) - g(y)‖ when s is given)."""
    g0, g1 = np.array([[0.6, 0.8]]), np.array([[0.8, 0.6]])
    d0, d1 = np.array([0.1]), np.array([0.1 + 5e-6])
    assert certify.radius_2afc(d0, d1, g0, g1)[0] == 0.0
    assert certify.radius_2afc_plain(d0, d1, g0, g1, np.array([3.0]))[0] == 0.0
    assert certify.radius_threshold(d0, 0.1 + 5e-6)[0] == 0.0
    lo, hi = certify.distance_interval(d0, 0.0)
    assert lo[0] <= 0.1 - 5e-6 and 0.1 + 5e-6 <= hi[0]
    s = np.sqrt(2 * d0)  # given s = ‖g(x) - g(y)‖, the noise allowed is on s (EMBED_SLACK)
    lo, hi = certify.distance_interval(d0, 0.0, s=s)
    assert lo[0] <= 0.5 * (s[0] - 5e-6) ** 2 and 0.5 * (s[0] + 5e-6) ** 2 <= hi[0]


# -- plumbing: the caller's kind out, NumPy and torch agree ------------------------------------


def test_torch_in_torch_out_numpy_in_numpy_out():
    rng = np.random.default_rng(8)
    f = rng.standard_normal((3, 2, 5)).astype(np.float32)
    cert_np = certify.certificate_from_features(*f, "append")
    cert_t = certify.certificate_from_features(*torch.from_numpy(f), "append")
    assert isinstance(cert_np.radius, np.ndarray) and isinstance(cert_t.radius, torch.Tensor)
    assert np.array_equal(cert_np.radius, cert_t.radius.numpy())
    assert np.array_equal(cert_np.closer, cert_t.closer.numpy())
    g = certify.normalise_features(f[0], "append")
    assert g.dtype == np.float64 and np.allclose(np.linalg.norm(g, axis=1), 1.0)
    assert np.allclose(g[:, :5], f[0] / np.linalg.norm(np.c_[f[0], np.ones(2)], axis=1, keepdims=True))
    with pytest.raises(ValueError, match="unknown embedding"):
        certify.normalise_features(f[0], "cosine")
