"""Each 1-Lipschitz layer: its bound checked numerically (exact Jacobians and power iteration)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipsim.layers import (
    Flatten,
    SLLConv2d,
    SLLLinear,
    SpaceToDepth,
    SumPool,
    Truncate,
    ZeroChannelPad,
    ZeroPadFeatures,
    safe_inverse,
    sll_conv_rescaling,
    sll_linear_rescaling,
)
from lipsim.verify import jacobian_spectral_norm

TOL = 1e-5


def jacobian_norm(layer, x):
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.view_as(x)).flatten(), x.flatten())
    return torch.linalg.matrix_norm(jac, ord=2).item()


@settings(max_examples=25, deadline=None)
@given(
    features=st.integers(2, 24),
    inner=st.integers(1, 24),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 10),
)
def test_sll_linear_jacobian_at_most_one(features, inner, seed, scale):
    torch.manual_seed(seed)
    layer = SLLLinear(features, inner).double()
    with torch.no_grad():
        layer.weight.mul_(scale)
    x = torch.randn(1, features, dtype=torch.float64) * scale
    assert jacobian_norm(layer, x) <= 1 + TOL


@settings(max_examples=15, deadline=None)
@given(
    channels=st.integers(1, 4), inner=st.integers(1, 5), side=st.integers(3, 6), seed=st.integers(0, 10_000)
)
def test_sll_conv_jacobian_at_most_one(channels, inner, side, seed):
    torch.manual_seed(seed)
    layer = SLLConv2d(channels, inner).double()
    x = torch.randn(1, channels, side, side, dtype=torch.float64)
    assert jacobian_norm(layer, x) <= 1 + TOL


def test_sll_conv_rescaling_dominates_gram_operator():
    """T - KK* is positive semi-definite on a finite zero-padded grid (explicit matrices)."""
    torch.manual_seed(3)
    for _ in range(5):
        kernel = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        side = 5
        n_in = 3 * side * side
        eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 3, side, side)
        k_mat = torch.nn.functional.conv2d(eye, kernel, padding=1).view(n_in, -1).T  # (out, in)
        gram = k_mat @ k_mat.T
        t = sll_conv_rescaling(kernel).repeat_interleave(side * side)
        assert torch.linalg.eigvalsh(torch.diag(t) - gram).min() >= -1e-9


def test_conv_q_is_ignored_and_linear_q_is_used():
    torch.manual_seed(0)
    conv = SLLConv2d(3, 4)
    x = torch.randn(2, 3, 8, 8)
    conv(x).square().sum().backward()
    assert conv.q.grad is None or torch.count_nonzero(conv.q.grad) == 0
    lin = SLLLinear(6, 5)
    y = torch.randn(3, 6)
    before = lin(y).detach()
    with torch.no_grad():
        lin.q.add_(torch.linspace(-2, 2, 5))
    assert not torch.allclose(before, lin(y).detach())


def test_safe_inverse_maps_zero_to_zero():
    t = torch.tensor([0.0, 2.0, 4.0])
    assert torch.equal(safe_inverse(t), torch.tensor([0.0, 0.5, 0.25]))


def test_dead_inner_channel_does_not_produce_nan():
    layer = SLLConv2d(3, 2)
    with torch.no_grad():
        layer.kernel[0].zero_()
    out = layer(torch.randn(1, 3, 5, 5))
    assert torch.isfinite(out).all()


def test_isometries_preserve_norms():
    x = torch.randn(3, 3, 16, 16)
    y = torch.randn(3, 3, 16, 16)
    for layer in (ZeroChannelPad(7), SpaceToDepth(4), Flatten()):
        a, b = layer(x), layer(y)
        assert torch.allclose((a - b).flatten(1).norm(dim=1), (x - y).flatten(1).norm(dim=1), atol=1e-5)
    z = torch.randn(4, 10)
    assert torch.allclose(ZeroPadFeatures(15)(z).norm(dim=1), z.norm(dim=1))


def test_space_to_depth_is_a_permutation():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8)
    out = SpaceToDepth(4)(x)
    assert out.shape == (1, 48, 2, 2)
    assert torch.equal(out.flatten().sort().values, x.flatten())


def test_sum_pool_bound_is_one_and_tight():
    pool = SumPool(4)
    constant = torch.ones(1, 1, 8, 8)
    assert torch.isclose(pool(constant).norm(), constant.norm())  # ratio exactly 1
    torch.manual_seed(1)
    for _ in range(20):
        x = torch.randn(2, 3, 16, 16)
        assert (pool(x).flatten(1).norm(dim=1) <= x.flatten(1).norm(dim=1) + 1e-5).all()
    assert torch.allclose(pool(constant), torch.full((1, 1, 2, 2), 4.0))


def test_truncate_keeps_leading_coordinates():
    z = torch.arange(10.0).view(1, 10)
    assert torch.equal(Truncate(4)(z), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def test_power_iteration_matches_svd():
    torch.manual_seed(0)
    mat = torch.randn(7, 5, dtype=torch.float64)
    fn = lambda v: v @ mat.T  # noqa: E731
    est = jacobian_spectral_norm(fn, torch.randn(2, 5, dtype=torch.float64), iters=200)
    assert torch.allclose(est, torch.linalg.matrix_norm(mat, ord=2).expand(2), rtol=1e-6)


def test_power_iteration_on_sll_layers_stays_below_one():
    torch.manual_seed(2)
    conv = SLLConv2d(6, 5)
    lin = SLLLinear(40, 16)
    assert jacobian_spectral_norm(conv, torch.randn(2, 6, 12, 12), iters=40).max() <= 1 + 1e-4
    assert jacobian_spectral_norm(lin, torch.randn(3, 40), iters=40).max() <= 1 + 1e-4


def test_cached_rescaling_follows_weight_updates():
    layer = SLLLinear(8, 4).eval().requires_grad_(False)
    x = torch.randn(2, 8)
    first = layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    fresh = SLLLinear(8, 4)
    fresh.load_state_dict(layer.state_dict())
    assert torch.allclose(layer(x), fresh(x), atol=1e-6)
    assert not torch.allclose(first, layer(x))


def test_cache_sees_untracked_writes_through_data():
    """`param.data` writes bypass version counters; the value fingerprint still catches them."""
    layer = SLLConv2d(3, 4).eval().requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    layer(x)
    layer.kernel.data.mul_(3.0)
    fresh = SLLConv2d(3, 4).requires_grad_(False)
    fresh.load_state_dict(layer.state_dict())
    assert torch.allclose(layer(x), fresh(x), atol=1e-6)
    assert jacobian_spectral_norm(layer, x, iters=30).max() <= 1 + 1e-4


def test_cache_sees_permutations_within_a_row_through_data():
    """A .data write that keeps every row's sum and norm (entries moved within a row) changes
    WWᵀ: the cached T must not survive it (it made the layer 2-Lipschitz before the fix)."""
    layer = SLLLinear(8, 2).eval().requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]]))
        layer.bias.fill_(10.0)
        layer.q.zero_()
    layer(torch.randn(4, 8))  # caches T = (2, 2): orthogonal rows
    layer.weight.data[1] = torch.tensor([0.0, 1, 1, 0, 0, 0, 0, 0])  # overlaps row 0 now
    exact = 2 * safe_inverse(sll_linear_rescaling(layer.weight.double(), layer.q.double()))
    assert torch.allclose(layer.scale().double(), exact, rtol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0], torch.zeros(8))
    assert torch.linalg.matrix_norm(jac, 2) <= 1 + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rescaling_of_16_bit_parameters_is_computed_in_float32(dtype):
    """T summed in 16 bits can fall below WWᵀ (bf16 lost 0.36 % on rows like these, enough to
    break a certified radius end to end): the rescaling upcasts first."""
    gen = torch.Generator().manual_seed(0)
    layer = SLLLinear(64, 4)
    with torch.no_grad():
        w = torch.zeros(4, 64)
        for i in range(4):  # disjoint positive rows: WWᵀ diagonal, the SLL bound is tight
            w[i, 16 * i : 16 * (i + 1)] = torch.rand(16, generator=gen) + 0.2
        layer.weight.copy_(w)
        layer.q.zero_()
    layer = layer.to(dtype).eval().requires_grad_(False)
    used = layer.scale()
    assert used.dtype == torch.float32
    exact = 2 * safe_inverse(sll_linear_rescaling(layer.weight.double(), layer.q.double()))
    assert (used.double() <= exact * (1 + 1e-6)).all()
    conv = SLLConv2d(5, 3).to(dtype).eval().requires_grad_(False)
    k = conv.kernel.double()
    exact_conv = 2 * safe_inverse(sll_conv_rescaling(k))
    assert conv.scale().dtype == torch.float32
    assert (conv.scale().double() <= exact_conv * (1 + 1e-6)).all()


def test_rescaling_is_ieee_float32_under_autocast():
    """embed_fast runs under a bf16 autocast: the rescaling (what lipsim.engine.fold folds into the
    kernels) must come out the same there, in float32."""
    for layer in (SLLConv2d(6, 4), SLLLinear(12, 5)):
        layer.eval().requires_grad_(False)
        scale = layer.scale()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_amp = layer.scale()
        assert under_amp.dtype == torch.float32 and torch.equal(under_amp, scale)


def test_training_rescaling_is_float32_under_autocast():
    """With gradients flowing (training under --amp), T is still summed in float32."""
    torch.manual_seed(0)
    for layer in (SLLConv2d(6, 4), SLLLinear(12, 5)):
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape))
        exact = layer.scale()  # gradients on: recomputed, float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_amp = layer.scale()
        assert under_amp.dtype == torch.float32 and torch.equal(under_amp, exact)
        under_amp.sum().backward()  # still differentiable


def test_shift_is_an_isometry():
    from lipsim.layers import Shift

    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    shift = Shift(0.5)
    assert torch.allclose(shift(x) - shift(y), x - y)
