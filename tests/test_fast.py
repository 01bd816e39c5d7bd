"""The fused inference path (lipsim.fast), the rescaling cache and the precision contract.

Every fast-path check compares against the plain layer-by-layer forward on random weights
(biases and q included) and random inputs: float32 outputs must agree to a relative error of
1e-5. Cache checks compare a layer that has cached its rescaling with a fresh copy of its
current weights.
"""

from __future__ import annotations

import copy
import inspect
import os
import pickle

import pytest
import torch

import lipsim
from lipsim import fast, layers
from lipsim.archs import LipschitzBackbone
from lipsim.layers import SLLConv2d, SLLLinear
from lipsim.model import exact_float32

REL = 1e-5
KERNEL_SETS = ["portable"] + (["mkldnn"] if fast.kernels_for("cpu") == "mkldnn" else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random kernels/weights, biases and q, so that ReLUs switch and no rescaling is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if name.endswith(("bias", "q")) else 1.0
            if name.endswith(("kernel", "weight")):
                scale = p.std().item() or 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def fresh_copy(layer):
    new = type(layer)(
        *((layer.channels, layer.inner) if isinstance(layer, SLLConv2d) else (layer.features, layer.inner))
    )
    new.load_state_dict(layer.state_dict())
    return new.eval().requires_grad_(False)


@pytest.fixture
def images():
    return torch.rand((2, 3, 224, 224), generator=torch.Generator().manual_seed(1))


# -- the fused kernels against the plain layers -----------------------------------------------


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize(
    "channels,inner,ksize,shape", [(6, 5, 3, (2, 9, 11)), (13, 4, 5, (1, 8, 8)), (48, 16, 3, (2, 14, 14))]
)
def test_fused_sll_conv_matches_plain(kernels, channels, inner, ksize, shape):
    layer = randomise(SLLConv2d(channels, inner, kernel_size=ksize)).eval().requires_grad_(False)
    b, h, w = shape
    x = torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = layer(x)
        buf = x.clone(memory_format=torch.channels_last)
        out = fast._sll_conv_inplace(layer, buf, kernels)
    assert out.data_ptr() == buf.data_ptr()  # really in place
    assert rel_err(out, plain) <= REL


def test_fused_sll_linear_matches_plain():
    layer = randomise(SLLLinear(40, 24)).eval().requires_grad_(False)
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert rel_err(fast._sll_linear(layer, x), layer(x)) <= REL


@pytest.mark.parametrize("arch", ["tiny", "tiny-s2d", "s2d-compact", "s2d-lite"])
def test_optimized_model_matches_plain(arch, images):
    plain = fast.restore(randomise(lipsim.create_model(arch), seed=1).requires_grad_(False))
    quick = fast.optimize(copy.deepcopy(plain))
    assert fast.is_optimized(quick) and not fast.is_optimized(plain)
    snapshot = images.clone()
    assert rel_err(quick.features(images), plain.features(images)) <= REL
    assert rel_err(quick.embed(images), plain.embed(images)) <= REL
    with torch.inference_mode():
        assert rel_err(quick.backbone(images), plain.backbone(images)) <= REL
    ref, x0, x1 = images[:1], images[1:], images[:1].flip(-1)
    a, b = quick.certify_2afc(ref, x0, x1), plain.certify_2afc(ref, x0, x1)
    assert torch.equal(a.closer, b.closer)
    assert torch.allclose(a.d0, b.d0, atol=1e-6) and torch.allclose(a.d1, b.d1, atol=1e-6)
    # radius = |d0 - d1| / B: the float32 rounding of d (~1e-7) is divided by B
    spread = (plain.embed(x0) - plain.embed(x1)).norm(dim=1).double()
    assert ((a.radius - b.radius).abs() <= 1e-6 / spread).all()
    assert torch.equal(images, snapshot)  # the caller's tensor is never overwritten
    cl = images.contiguous(memory_format=torch.channels_last)
    quick.embed(cl)
    assert torch.equal(cl, snapshot)


def test_optimize_keeps_state_dict_saving_and_copies(tmp_path, images):
    model = randomise(lipsim.create_model("tiny-s2d"), seed=2).requires_grad_(False)
    keys = list(model.state_dict())
    fast.optimize(model)
    assert list(model.state_dict()) == keys and isinstance(model.backbone, LipschitzBackbone)
    ref = model.embed(images)
    model.save(tmp_path / "m.safetensors")
    assert torch.allclose(lipsim.load(tmp_path / "m.safetensors").embed(images), ref, atol=1e-6)
    clone = pickle.loads(pickle.dumps(model))
    assert fast.is_optimized(clone) and rel_err(clone.embed(images), ref) <= REL
    fast.restore(model)
    assert type(model.backbone) is LipschitzBackbone and rel_err(model.embed(images), ref) <= REL


def test_gradients_and_hooks_take_the_plain_path(images):
    plain = fast.restore(randomise(lipsim.create_model("tiny"), seed=3).requires_grad_(False))
    quick = fast.optimize(copy.deepcopy(plain))
    x1 = images.clone().requires_grad_(True)
    x2 = images.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(quick.embed(x1)[:, 0].sum(), x1)
    (g2,) = torch.autograd.grad(plain.embed(x2)[:, 0].sum(), x2)
    assert rel_err(g1, g2) <= REL
    # torch.func (used by lipsim.verify) sees a differentiable function too
    v = torch.randn_like(images)
    _, t1 = torch.func.jvp(quick.backbone, (images,), (v,))
    _, t2 = torch.func.jvp(plain.backbone, (images,), (v,))
    assert rel_err(t1, t2) <= REL
    seen = []
    conv = next(m for _, m in quick.backbone.lipschitz_layers() if isinstance(m, SLLConv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    quick.embed(images)
    handle.remove()
    assert seen  # a hooked layer is called as a module


def test_bf16_fast_path_runs_on_cpu(images):
    model = fast.optimize(randomise(lipsim.create_model("tiny-s2d"), seed=4).requires_grad_(False))
    plain = fast.restore(randomise(lipsim.create_model("tiny-s2d"), seed=4).requires_grad_(False))
    e16, e16_plain, e32 = model.embed_fast(images), plain.embed_fast(images), model.embed(images)
    assert e16.dtype == torch.float32 and torch.isfinite(e16).all()
    assert rel_err(e16, e32) < 3e-2 and rel_err(e16, e16_plain) < 3e-2


def test_alternating_float32_and_bf16_calls_keep_both_folded_weights(images, monkeypatch):
    """Certified embeddings and bf16 ranking in turn (retrieval does this) used to refold and
    re-pack every SLL convolution's weights on each switch."""
    model = fast.optimize(randomise(lipsim.create_model("tiny-s2d"), seed=4).requires_grad_(False))
    model.embed(images), model.embed_fast(images)
    folds = []
    original = fast._fold

    def counting(*args):
        folds.append(args)
        return original(*args)

    monkeypatch.setattr(fast, "_fold", counting)
    for _ in range(3):
        model.embed(images), model.embed_fast(images)
    assert not folds
    with torch.no_grad():  # a weight change still refolds
        dict(model.backbone.lipschitz_layers())["stage0.0"].bias.add_(0.1)
    model.embed(images)
    assert len(folds) == 1


# -- the rescaling cache ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: SLLLinear(20, 8), lambda: SLLConv2d(6, 4)])
def test_cache_follows_in_place_updates_and_load_state_dict(make):
    layer = randomise(make()).eval().requires_grad_(False)
    x = torch.randn((3, 20) if isinstance(layer, SLLLinear) else (2, 6, 7, 7))
    with torch.no_grad():
        first = layer(x)
        # a uniform shift of q would cancel in exp(q_j - q_i): change it unevenly
        layer.q.add_(torch.linspace(0, 2, layer.q.numel())) if isinstance(
            layer, SLLLinear
        ) else layer.kernel.mul_(1.7)
        assert torch.equal(layer(x), fresh_copy(layer)(x))
        assert not torch.allclose(layer(x), first)
        layer.load_state_dict(randomise(make(), seed=9).state_dict())
        assert torch.equal(layer(x), fresh_copy(layer)(x))


@pytest.mark.parametrize("opt_kwargs", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_cache_follows_optimizer_steps_including_fused(opt_kwargs):
    # fused optimizers write parameters without bumping their version counters
    layer = randomise(SLLLinear(20, 8))
    x = torch.randn(4, 20)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, **opt_kwargs)
    for _ in range(2):
        layer.eval()
        with torch.no_grad():
            cached = layer(x)  # fills the cache
            assert torch.equal(cached, fresh_copy(layer)(x))
        layer.train()
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        layer.eval()
        with torch.no_grad():
            assert torch.equal(layer(x), fresh_copy(layer)(x))


def test_fast_path_follows_weight_updates(images):
    model = fast.optimize(randomise(lipsim.create_model("tiny-s2d"), seed=5).requires_grad_(False))
    before = model.embed(images)
    conv = next(m for _, m in model.backbone.lipschitz_layers() if isinstance(m, SLLConv2d))
    with torch.no_grad():
        conv.kernel.mul_(1.5)
        conv.bias.add_(0.2)
    plain = copy.deepcopy(model)
    fast.restore(plain)
    after = model.embed(images)
    assert rel_err(after, plain.embed(images)) <= REL and not torch.allclose(after, before)


def test_cache_and_fast_path_see_writes_through_data(images):
    # .data writes bypass version counters; the value fingerprint catches them, row swaps included
    layer = randomise(SLLLinear(16, 6)).eval().requires_grad_(False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.weight.data.copy_(layer.weight.data[[1, 0, 2, 3, 4, 5]])
        assert torch.equal(layer(x), fresh_copy(layer)(x))
    model = fast.optimize(randomise(lipsim.create_model("tiny-s2d"), seed=10).requires_grad_(False))
    model.embed(images)
    conv = next(m for _, m in model.backbone.lipschitz_layers() if isinstance(m, SLLConv2d))
    conv.kernel.data.mul_(2.0)
    plain = fast.restore(copy.deepcopy(model))
    assert rel_err(model.embed(images), plain.embed(images)) <= REL


def test_cache_filled_in_inference_mode_allows_input_gradients():
    layer = randomise(SLLLinear(10, 6)).eval().requires_grad_(False)
    x = torch.randn(2, 10)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.isfinite(g).all()


def test_cache_is_computed_in_ieee_float32_whoever_fills_it(images):
    reference = fast.restore(randomise(lipsim.create_model("tiny-s2d"), seed=6).requires_grad_(False))
    expected = reference.embed(images)
    poisoned = copy.deepcopy(reference)
    poisoned.embed_fast(images)  # fills the cache under bf16 autocast
    assert torch.equal(poisoned.embed(images), expected)
    other = copy.deepcopy(reference)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bf16 matmuls on CPUs that have them
        with torch.no_grad():
            other.backbone(images)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert torch.equal(other.embed(images), expected)


def test_cache_is_not_pickled_or_deep_copied():
    layer = randomise(SLLLinear(12, 5)).eval().requires_grad_(False)
    with torch.no_grad():
        layer(torch.randn(1, 12))
    assert "_cache" in layer.__dict__
    assert "_cache" not in copy.deepcopy(layer).__dict__
    assert "_cache" not in pickle.loads(pickle.dumps(layer)).__dict__


# -- the rescaling is computed once per training step -------------------------------------------


def test_training_step_computes_each_rescaling_once(monkeypatch, images):
    counts: dict[int, int] = {}

    def counting(fn):
        def wrapped(weight, *args):
            counts[id(weight)] = counts.get(id(weight), 0) + 1
            return fn(weight, *args)

        return wrapped

    monkeypatch.setattr(layers, "sll_conv_rescaling", counting(layers.sll_conv_rescaling))
    monkeypatch.setattr(layers, "sll_linear_rescaling", counting(layers.sll_linear_rescaling))
    model = fast.optimize(lipsim.create_model("tiny-s2d"))
    sll = [m for _, m in model.backbone.lipschitz_layers() if isinstance(m, (SLLConv2d, SLLLinear))]
    ids = {id(m.kernel if isinstance(m, SLLConv2d) else m.weight) for m in sll}
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(2):
        counts.clear()
        loss = model(images[:1], images[1:]).sum()  # x and y go through the backbone as one batch
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert set(counts) == ids and all(c == 1 for c in counts.values()), (step, counts)
    # eval: computed once, then reused by every later forward until the weights change
    model.eval().requires_grad_(False)
    counts.clear()
    for _ in range(3):
        model.embed(images)
    assert set(counts) == ids and all(c == 1 for c in counts.values())
    model.requires_grad_(True)
    model(images[:1], images[1:]).sum().backward()
    opt.step()
    model.requires_grad_(False)
    counts.clear()
    model.embed(images)
    model.embed(images)
    assert set(counts) == ids and all(c == 1 for c in counts.values())


# -- precision contract -------------------------------------------------------------------------


def test_certified_path_stays_float32_under_global_reduced_precision(images):
    model = fast.optimize(randomise(lipsim.create_model("tiny-s2d"), seed=7).requires_grad_(False))
    expected_e = model.embed(images)
    expected_c = model.certify_2afc(images[:1], images[1:], images[:1].flip(-1))
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            e = model.embed(images)
            c = model.certify_2afc(images[:1], images[1:], images[:1].flip(-1))
            lo, hi = model.distance_interval(images[:1], images[1:], 0.1)
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is back
    finally:
        torch.set_float32_matmul_precision(prev)
    assert e.dtype == torch.float32 and torch.equal(e, expected_e)
    assert torch.equal(c.radius, expected_c.radius) and torch.equal(c.d0, expected_c.d0)
    assert c.radius.dtype in (torch.float32, torch.float64) and lo.dtype in (torch.float32, torch.float64)


def test_certified_path_under_per_backend_precision_api(images):
    model = randomise(lipsim.create_model("tiny"), seed=8).requires_grad_(False)
    expected = model.embed(images)
    saved = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        got = model.embed(images)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved
    assert torch.equal(got, expected)


def test_exact_float32_restores_every_precision_setting():
    names = ["cuda.matmul", "mkldnn.matmul", "mkldnn.conv", "cudnn.conv"]

    def state():
        return {
            n: getattr(getattr(torch.backends, n.split(".")[0]), n.split(".")[1]).fp32_precision
            for n in names
        }

    saved = state()
    objs = {n: getattr(getattr(torch.backends, n.split(".")[0]), n.split(".")[1]) for n in names}
    try:
        for n in ("cuda.matmul", "mkldnn.matmul"):
            objs[n].fp32_precision = "none"  # torch's initial value: inherit from the parent
        before = state()
        with exact_float32():
            pass
        after = state()
    finally:
        for n, value in saved.items():
            objs[n].fp32_precision = value
    assert after == before


def test_embed_fast_is_not_a_certified_output(images):
    model = fast.optimize(randomise(lipsim.create_model("tiny-s2d"), seed=9).requires_grad_(False))
    fast_e, exact_e = model.embed_fast(images), model.embed(images)
    assert type(fast_e) is torch.Tensor and not torch.equal(fast_e, exact_e)  # really reduced precision
    assert list(inspect.signature(lipsim.LipSim.embed_fast).parameters) == ["self", "x", "dtype"]
    assert "NOT certified" in lipsim.LipSim.embed_fast.__doc__
    for certified in (lipsim.LipSim.certify_2afc, lipsim.LipSim.distance_interval, lipsim.LipSim.embed):
        params = inspect.signature(certified).parameters
        assert "dtype" not in params and "fast" not in params  # no way to ask them for bf16


def test_use_kernels_names_and_falls_back_when_a_set_cannot_run():
    with pytest.raises(ValueError, match="kernels must be one of"):
        with fast.use_kernels("cudnn"):
            pass
    # Triton cannot run on CPU tensors outside its interpreter: the self-check fails, portable runs
    with fast.use_kernels("portable"):
        assert fast.kernels_for("cpu") == "portable"
    if not os.environ.get("TRITON_INTERPRET"):
        with fast.use_kernels("triton"):
            assert fast.kernels_for("cpu") == "portable"
    assert fast.kernels_for("cpu") in ("mkldnn", "portable")


def _gradcheck_fn(x, kernel, bias):
    from lipsim.layers import safe_inverse, sll_conv_rescaling

    return fast._SLLConvTrain.apply(x, kernel, bias, 2 * safe_inverse(sll_conv_rescaling(kernel)))


def test_fused_training_node_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, generator=gen).requires_grad_()
    kernel = (torch.randn(4, 6, 3, 3, dtype=torch.float64, generator=gen) * 0.4).requires_grad_()
    bias = (torch.randn(1, 4, 1, 1, dtype=torch.float64, generator=gen) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(_gradcheck_fn, (x, kernel, bias))


@pytest.mark.parametrize("arch", ["tiny", "tiny-s2d"])
def test_fused_training_step_matches_the_plain_graph(arch):
    model = lipsim.create_model(arch, seed=0)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.5)
    plain = fast.restore(copy.deepcopy(model))
    x = torch.rand(3, 3, 224, 224)
    target = torch.randn(3, model.backbone.out_dim)
    losses, grads = [], []
    for net in (model.backbone, plain.backbone):
        net.zero_grad()
        loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert fast.is_optimized(model) and not fast.is_optimized(plain)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert rel_err(grads[0][name], grads[1][name]) <= 1e-5, name
    # one graph node per SLL convolution in the fused training forward
    y = model.backbone(x)
    names = set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in names:
            continue
        names.add(node)
        stack += [nxt for nxt, _ in node.next_functions]
    assert any("SLLConvTrain" in type(n).__name__ for n in names)
