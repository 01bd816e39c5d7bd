"""model.pairwise (all pairs, each image embedded once), its certified intervals, the NumPy engine's
matching names, and the cached-embedding path's speed."""

import time

import numpy as np
import pytest
import torch

import lipsim
from lipsim import certify
from lipsim.numpy_engine import NumpyLipSim


def _twin(model):
    state = {k: v.detach().numpy() for k, v in model.backbone.state_dict().items()}
    return NumpyLipSim(model.config, state, embedding=model.embedding)


@pytest.fixture(params=["append", "plain"])
def model(request):
    return lipsim.create_model("tiny", embedding=request.param, seed=0).requires_grad_(False)


def _all_pairs(x, y):
    n, m = len(x), len(y)
    return x.repeat_interleave(m, 0), y.repeat(n, 1, 1, 1)


def test_pairwise_is_every_pair_with_its_interval(model):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(5, 3, 224, 224, generator=gen), torch.rand(3, 3, 224, 224, generator=gen)
    x[1] = y[2]  # an identical pair: d = 0, interval [0, ε²/2]-like
    d, lo, hi = model.pairwise(x, y, eps=36 / 255, batch_size=2)
    assert d.shape == lo.shape == hi.shape == (5, 3) and d.dtype == torch.float32
    ref_d, ref_lo, ref_hi = model.distance_with_interval(*_all_pairs(x, y), 36 / 255)
    assert torch.allclose(d.flatten(), ref_d, atol=1e-6)
    assert torch.allclose(lo.flatten(), ref_lo, atol=1e-6) and torch.allclose(hi.flatten(), ref_hi, atol=1e-6)
    assert float(d[1, 2]) < 1e-6 and bool((lo <= d).all() and (d <= hi).all())
    assert torch.allclose(model.pairwise(x, y), d)


def test_pairwise_embeds_each_image_once(model, monkeypatch):
    seen = []
    features = model.features
    monkeypatch.setattr(model, "features", lambda t: seen.append(len(t)) or features(t))
    x = torch.rand(7, 3, 224, 224)
    d = model.pairwise(x, batch_size=3)
    assert sum(seen) == 7 and seen == [3, 3, 1]
    assert d.shape == (7, 7) and torch.allclose(d, d.T, atol=1e-7) and float(d.diagonal().abs().max()) < 1e-6


def test_pairwise_intervals_hold_under_random_perturbations():
    model = lipsim.create_model("tiny", seed=0)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 3, 224, 224, generator=gen) * 0.8 + 0.1, torch.rand(3, 3, 224, 224, generator=gen)
    eps = 0.5
    _, lo, hi = model.pairwise(x, y, eps=eps)
    for _ in range(3):
        delta = torch.randn(x.shape, generator=gen)
        delta *= eps / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        moved = model.pairwise((x + delta).clamp(0, 1), y)
        assert bool((moved >= lo - 1e-6).all() and (moved <= hi + 1e-6).all())


def test_pairwise_rejects_empty_and_malformed_batches(model):
    with pytest.raises(ValueError, match="empty batch"):
        model.pairwise(torch.rand(0, 3, 224, 224))
    with pytest.raises(ValueError):
        model.pairwise(torch.rand(2, 3, 100, 100))
    with pytest.raises(ValueError, match="batch_size"):
        model.pairwise(torch.rand(2, 3, 224, 224), batch_size=0)


def test_numpy_engine_has_the_torch_names_and_answers(model):
    engine = _twin(model)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.rand(3, 3, 224, 224, generator=gen), torch.rand(3, 3, 224, 224, generator=gen)
    xn, yn = x.numpy(), y.numpy()
    assert engine.embed_dim == model.embed_dim and engine.input_size == model.input_size
    assert np.allclose(engine.embed(xn), model.embed(x).numpy(), atol=1e-5)
    assert np.allclose(engine.distance(xn, yn), model.distance(x, y).numpy(), atol=1e-5)
    assert np.allclose(engine(xn, yn[:1]), model(x, y[:1]).numpy(), atol=1e-5)  # a batch of 1 broadcasts
    for got, want in zip(
        engine.distance_interval(xn, yn, 0.2), model.distance_interval(x, y, 0.2), strict=True
    ):
        assert np.allclose(got, want.numpy(), atol=1e-5)
    for got, want in zip(
        engine.pairwise(xn, yn[:2], eps=0.2), model.pairwise(x, y[:2], eps=0.2), strict=True
    ):
        assert got.shape == (3, 2) and np.allclose(got, want.numpy(), atol=1e-5)
    assert np.allclose(engine.pairwise(xn), model.pairwise(x).numpy(), atol=1e-5)
    got, want = engine.certify_2afc(xn, yn, xn[::-1].copy()), model.certify_2afc(x, y, x.flip(0))
    assert np.array_equal(got.closer, want.closer.numpy())
    assert np.allclose(got.radius, want.radius.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        engine.distance(xn[:2], yn)


def test_pairwise_from_cached_embeddings_matches_and_is_fast():
    model = lipsim.create_model("tiny", seed=0)
    x = torch.rand(4, 3, 224, 224)
    g = model.embed(x)
    d, lo, hi = certify.pairwise_from_embeddings(g, g, eps=0.1, embedding="append")  # ‖f‖ from g
    want = model.pairwise(x, eps=0.1)
    for a, b in zip((d, lo, hi), want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1000, 1793)).astype(np.float32)  # the published models' dimension + 1
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    certify.pairwise_from_cached(emb[:10], None, 1793, "append")  # warm-up
    start = time.perf_counter()
    out = certify.pairwise_from_cached(emb, None, 1793, "append")  # what model.pairwise(g) runs
    elapsed = time.perf_counter() - start
    assert out.shape == (1000, 1000) and float(np.abs(np.diag(out)).max()) < 1e-6
    assert elapsed < 1.0, f"1000 x 1000 pairwise took {elapsed:.2f} s"


def test_pairwise_takes_cached_embeddings_in_both_engines(model):
    x, y = torch.rand(3, 3, 224, 224), torch.rand(2, 3, 224, 224)
    gx, gy = model.embed(x), model.embed(y)
    assert torch.allclose(model.pairwise(gx, gy), model.pairwise(x, y), atol=1e-5)
    engine = _twin(model)
    assert np.allclose(engine.pairwise(gx.numpy(), gy.numpy()), model.pairwise(x, y).numpy(), atol=1e-5)
    assert torch.allclose(model.pairwise(gx), model.pairwise(x), atol=1e-5)
    if model.embedding == "append":
        for got, want in zip(model.pairwise(gx, gy, eps=0.1), model.pairwise(x, y, eps=0.1), strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="append-mode"):
            model.pairwise(gx, gy, eps=0.1)
    with pytest.raises(ValueError, match="embeddings"):
        model.pairwise(gx[:, :-1])
    with pytest.raises(ValueError, match="unit norm"):
        model.pairwise(gx * 2)
