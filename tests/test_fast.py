"""The frozen inference engine (lipsim.engine), its kernel sets (lipsim.fast), the fused training
node of the SLL convolution and the precision contract.

Every engine check compares against a reference written from the definitions on random weights
(biases and q included) and random inputs — ``x - 𝒦*(s·ReLU(𝒦x + b))`` with the transposed
convolution itself, not the fold: float32 outputs must agree to a relative error of 1e-5.
Staleness checks compare a model whose weights changed with a fresh copy of its current weights.
"""

from __future__ import annotations

import copy
import inspect
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import lipsim
from lipsim import fast, layers
from lipsim.archs import LipschitzBackbone
from lipsim.embedding import normalise
from lipsim.engine import FrozenBackbone, fold
from lipsim.layers import SLLConv2d, SLLLinear, fold_sll_conv, safe_inverse, sll_conv_rescaling
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


def reference_conv(layer: SLLConv2d, x: torch.Tensor) -> torch.Tensor:
    """The SLL convolution from its definition (transposed convolution, rescaling after the ReLU)."""
    k = layer.kernel.detach().double()
    s = 2 * safe_inverse(sll_conv_rescaling(k))
    pad = k.shape[-1] // 2
    res = F.relu(F.conv2d(x.double(), k, layer.bias.detach().double().view(-1), padding=pad))
    return x.double() - F.conv_transpose2d(res * s.view(1, -1, 1, 1), k, padding=pad)


def reference_linear(layer: SLLLinear, x: torch.Tensor) -> torch.Tensor:
    w, q = layer.weight.detach().double(), layer.q.detach().double()
    s = 2 * safe_inverse(layers.sll_linear_rescaling(w, q))
    return x.double() - (F.relu(x.double() @ w.T + layer.bias.detach().double().view(-1)) * s) @ w


def reference_features(model, x: torch.Tensor) -> torch.Tensor:
    """The backbone, layer by layer from the definitions, in float64."""
    x = x.double()
    with torch.no_grad():
        for _, layer in model.backbone.lipschitz_layers():
            if isinstance(layer, SLLConv2d):
                x = reference_conv(layer, x)
            elif isinstance(layer, SLLLinear):
                x = reference_linear(layer, x)
            else:
                x = layer(x)
    return x


@pytest.fixture
def images():
    return torch.rand((2, 3, 224, 224), generator=torch.Generator().manual_seed(1))


# -- the kernel sets and the layers against the definitions -----------------------------------


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize(
    "channels,inner,ksize,shape", [(6, 5, 3, (2, 9, 11)), (13, 4, 5, (1, 8, 8)), (48, 16, 3, (2, 14, 14))]
)
def test_kernel_sets_and_layer_match_the_definition(kernels, channels, inner, ksize, shape):
    layer = randomise(SLLConv2d(channels, inner, kernel_size=ksize)).eval().requires_grad_(False)
    b, h, w = shape
    x = torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(3))
    expected = reference_conv(layer, x)
    with torch.no_grad():
        assert rel_err(layer(x), expected) <= REL
        buf = x.clone(memory_format=torch.channels_last)
        packed = fast.pack(kernels, *fold_sll_conv(layer.kernel, layer.bias, layer.scale()), buf)
        out = fast.sll_conv_inplace(kernels, buf, packed)
    assert out.data_ptr() == buf.data_ptr()  # really in place
    assert rel_err(out, expected) <= REL


def test_sll_linear_matches_the_definition():
    layer = randomise(SLLLinear(40, 24)).eval().requires_grad_(False)
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert rel_err(layer(x), reference_linear(layer, x)) <= REL


@pytest.mark.parametrize("arch", ["tiny", "tiny-s2d", "s2d-compact", "s2d-lite"])
def test_frozen_model_matches_the_definition(arch, images):
    model = randomise(lipsim.create_model(arch), seed=1).requires_grad_(False)
    quick = model.freeze()
    assert quick.frozen and not model.frozen and type(model.backbone) is LipschitzBackbone  # no swap
    assert isinstance(quick.backbone, FrozenBackbone) and fold(quick.backbone) is quick.backbone
    snapshot = images.clone()
    expected = reference_features(model, images)
    assert rel_err(quick.features(images), expected) <= REL
    assert rel_err(model.features(images), expected) <= REL
    assert rel_err(quick.embed(images), normalise(expected, model.embedding)) <= REL
    with torch.inference_mode():
        assert rel_err(quick.backbone(images), expected) <= REL
    ref, x0, x1 = images[:1], images[1:], images[:1].flip(-1)
    a, b = quick.certify_2afc(ref, x0, x1), model.certify_2afc(ref, x0, x1)
    assert torch.equal(a.closer, b.closer)
    assert torch.allclose(a.d0, b.d0, atol=1e-6) and torch.allclose(a.d1, b.d1, atol=1e-6)
    # radius = |d0 - d1| / B: the float32 rounding of d (~1e-7) is divided by B
    spread = (model.embed(x0) - model.embed(x1)).norm(dim=1).double()
    assert ((a.radius - b.radius).abs() <= 1e-6 / spread).all()
    assert torch.equal(images, snapshot)  # the caller's tensor is never overwritten
    cl = images.contiguous(memory_format=torch.channels_last)
    quick.embed(cl)
    assert torch.equal(cl, snapshot)


def test_freeze_keeps_the_model_its_state_dict_saving_and_copies(tmp_path, images):
    model = randomise(lipsim.create_model("tiny-s2d"), seed=2).requires_grad_(False)
    keys = list(model.state_dict())
    frozen = model.freeze()
    assert list(model.state_dict()) == keys and type(model.backbone) is LipschitzBackbone
    assert list(frozen.parameters()) == [] and list(frozen.state_dict()) == []  # training never sees it
    assert frozen.freeze() is frozen
    model.untrained = True  # notes callers attach to a model travel with its frozen engine
    assert model.freeze().untrained and not hasattr(frozen, "untrained")
    ref = frozen.embed(images)
    model.save(tmp_path / "m.safetensors")
    assert torch.allclose(lipsim.load(tmp_path / "m.safetensors").embed(images), ref, atol=1e-6)
    with pytest.raises(TypeError, match="save the model it was frozen from"):
        frozen.save(tmp_path / "frozen.safetensors")
    clone = pickle.loads(pickle.dumps(frozen))
    assert clone.frozen and rel_err(clone.embed(images), ref) <= REL
    assert rel_err(copy.deepcopy(frozen).embed(images), ref) <= REL
    assert rel_err(model.embed(images), ref) <= REL


def test_input_gradients_through_the_engine_and_hooks_on_the_layers(images):
    model = randomise(lipsim.create_model("tiny"), seed=3).requires_grad_(False)
    quick = model.freeze()
    x1 = images.clone().requires_grad_(True)
    x2 = images.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(quick.embed(x1)[:, 0].sum(), x1)
    (g2,) = torch.autograd.grad(normalise(model.backbone(x2), model.embedding)[:, 0].sum(), x2)
    assert rel_err(g1, g2) <= REL
    (g3,) = torch.autograd.grad(model.embed(x1)[:, 0].sum(), x1)  # not frozen: folded for the call
    assert rel_err(g3, g2) <= REL
    # torch.func (used by lipsim.verify) sees a differentiable function too
    v = torch.randn_like(images)
    _, t1 = torch.func.jvp(quick.backbone, (images,), (v,))
    _, t2 = torch.func.jvp(model.backbone, (images,), (v,))
    assert rel_err(t1, t2) <= REL
    # the layers are modules (hooks fire, as lipsim.verify uses them); the engine calls none of them
    seen = []
    conv = next(m for _, m in model.backbone.lipschitz_layers() if isinstance(m, SLLConv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model.backbone(images)
    assert seen
    seen.clear()
    quick.embed(images)
    handle.remove()
    assert not seen


def test_bf16_engine_runs_on_cpu(images):
    model = randomise(lipsim.create_model("tiny-s2d"), seed=4).requires_grad_(False)
    frozen = model.freeze()
    e16, e16_unfrozen, e32 = frozen.embed_fast(images), model.embed_fast(images), model.embed(images)
    assert e16.dtype == torch.float32 and torch.isfinite(e16).all()
    assert rel_err(e16, e32) < 3e-2 and rel_err(e16, e16_unfrozen) < 3e-2


def test_alternating_float32_and_bf16_calls_keep_both_packed_weights(images, monkeypatch):
    """Certified embeddings and bf16 ranking in turn (retrieval does this) must not re-pack every
    SLL convolution's weights on each switch."""
    model = randomise(lipsim.create_model("tiny-s2d"), seed=4).requires_grad_(False).freeze()
    model.embed(images), model.embed_fast(images)
    packs = []
    original = fast.pack

    def counting(*args):
        packs.append(args)
        return original(*args)

    monkeypatch.setattr(fast, "pack", counting)
    for _ in range(3):
        model.embed(images), model.embed_fast(images)
    assert not packs
    model.backbone.to(torch.float64)  # moved buffers drop the packed layouts
    model.embed(images)
    assert packs


# -- no stale weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: SLLLinear(20, 8), lambda: SLLConv2d(6, 4)])
def test_layers_follow_in_place_updates_and_load_state_dict(make):
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
def test_certificates_follow_optimizer_steps_including_fused(opt_kwargs, images):
    # fused optimizers write parameters without bumping their version counters
    model = randomise(lipsim.create_model("tiny-s2d"), seed=11)
    ref, x0, x1 = images[:1], images[1:], images[:1].flip(-1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, **opt_kwargs)
    for _ in range(2):
        model.eval()
        frozen = model.freeze()
        before = model.certify_2afc(ref, x0, x1)
        model.train()
        model(images[:1], images[1:]).sum().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        fresh = lipsim.LipSim.from_config("tiny-s2d")
        fresh.load_state_dict(model.state_dict())
        got, expected = model.certify_2afc(ref, x0, x1), fresh.certify_2afc(ref, x0, x1)
        assert torch.equal(got.radius, expected.radius) and torch.equal(got.d0, expected.d0)
        assert not torch.equal(got.d0, before.d0)
        # a frozen engine is a snapshot of the weights it was built from (documented)
        assert torch.equal(frozen.certify_2afc(ref, x0, x1).d0, before.d0)


def test_model_sees_writes_through_data(images):
    # .data writes bypass version counters: nothing is cached, so nothing can miss them
    layer = randomise(SLLLinear(16, 6)).eval().requires_grad_(False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)
        layer.weight.data.copy_(layer.weight.data[[1, 0, 2, 3, 4, 5]])
        assert torch.equal(layer(x), fresh_copy(layer)(x))
    model = randomise(lipsim.create_model("tiny-s2d"), seed=10).requires_grad_(False)
    before = model.embed(images)
    conv = next(m for _, m in model.backbone.lipschitz_layers() if isinstance(m, SLLConv2d))
    conv.kernel.data.mul_(2.0)
    after = model.embed(images)
    assert rel_err(after, normalise(reference_features(model, images), model.embedding)) <= REL
    assert not torch.allclose(after, before)


def test_engine_frozen_in_inference_mode_allows_input_gradients(images):
    model = randomise(lipsim.create_model("tiny"), seed=5).requires_grad_(False)
    with torch.inference_mode():
        frozen = model.freeze()
        frozen.embed(images)
    x = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(frozen.embed(x).sum(), x)
    assert torch.isfinite(g).all()


def test_fold_is_ieee_float32_whoever_calls_it(images):
    model = randomise(lipsim.create_model("tiny-s2d"), seed=6).requires_grad_(False)
    expected = model.freeze().embed(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = model.freeze()
    assert torch.equal(under_amp.embed(images), expected)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bf16 matmuls on CPUs that have them
        medium = model.freeze()
    finally:
        torch.set_float32_matmul_precision(prev)
    assert torch.equal(medium.embed(images), expected)


def test_layers_hold_no_derived_state(images):
    model = randomise(lipsim.create_model("tiny-s2d"), seed=12).requires_grad_(False)
    before = {name: set(m.__dict__) for name, m in model.named_modules()}
    model.embed(images), model.embed_fast(images), model.freeze().embed(images)
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before


# -- the rescaling is computed once per training step, and once per freeze -----------------------


def test_training_step_computes_each_rescaling_once(monkeypatch, images):
    counts: dict[int, int] = {}

    def counting(fn):
        def wrapped(weight, *args):
            counts[id(weight)] = counts.get(id(weight), 0) + 1
            return fn(weight, *args)

        return wrapped

    monkeypatch.setattr(layers, "sll_conv_rescaling", counting(layers.sll_conv_rescaling))
    monkeypatch.setattr(layers, "sll_linear_rescaling", counting(layers.sll_linear_rescaling))
    model = lipsim.create_model("tiny-s2d")
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
    # eval: computed once by freeze(), never by the frozen engine's forwards
    model.eval().requires_grad_(False)
    counts.clear()
    frozen = model.freeze()
    for _ in range(3):
        frozen.embed(images)
    assert set(counts) == ids and all(c == 1 for c in counts.values())
    counts.clear()
    model.embed(images)  # not frozen: folded (once) for this call
    assert set(counts) == ids and all(c == 1 for c in counts.values())


# -- precision contract -------------------------------------------------------------------------


def test_certified_path_stays_float32_under_global_reduced_precision(images):
    model = randomise(lipsim.create_model("tiny-s2d"), seed=7).requires_grad_(False).freeze()
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
    model = randomise(lipsim.create_model("tiny-s2d"), seed=9).requires_grad_(False).freeze()
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

    return layers._SLLConvTrain.apply(x, kernel, bias, 2 * safe_inverse(sll_conv_rescaling(kernel)))


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
    plain = copy.deepcopy(model)
    layers.use_fused_training(plain, False)
    x = torch.rand(3, 3, 224, 224)
    target = torch.randn(3, model.backbone.out_dim)
    losses, grads = [], []
    for net in (model.backbone, plain.backbone):
        net.zero_grad()
        loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert all(m.fused_training for m in model.modules() if isinstance(m, SLLConv2d))
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
