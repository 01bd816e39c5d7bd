"""lipsim.metrics.LipSimDistance: a torchmetrics Metric following torchmetrics' LPIPS class."""

import pytest
import torch

pytest.importorskip("torchmetrics")

import lipsim  # noqa: E402
from lipsim.metrics import LipSimDistance  # noqa: E402


@pytest.fixture(params=["append", "plain"])
def model(request):
    return lipsim.create_model("tiny", embedding=request.param, seed=0).requires_grad_(False)


def _batches(seed=0, n=3, size=224):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen), torch.rand(n, 3, size, size, generator=gen)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_update_and_compute_reduce_every_pair(model, reduction):
    metric = LipSimDistance(model, reduction=reduction)
    (x1, y1), (x2, y2) = _batches(0), _batches(1, n=2)
    metric.update(x1, y1)
    metric.update(x2, y2)
    d = torch.cat([model(x1, y1), model(x2, y2)])
    want = {"mean": d.mean(), "sum": d.sum(), "none": d}[reduction]
    got = metric.compute()
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    metric.reset()
    metric.update(x2, y2)
    assert torch.allclose(
        metric.compute(), {"mean": d[3:].mean(), "sum": d[3:].sum(), "none": d[3:]}[reduction]
    )


def test_forward_returns_the_batch_value_and_accumulates(model):
    metric = LipSimDistance(model)
    (x1, y1), (x2, y2) = _batches(0), _batches(1)
    b1, b2 = metric(x1, y1), metric(x2, y2)
    assert torch.allclose(b1, model(x1, y1).mean(), atol=1e-6) and torch.allclose(
        b2, model(x2, y2).mean(), atol=1e-6
    )
    assert torch.allclose(metric.compute(), (b1 + b2) / 2, atol=1e-6)


def test_a_training_loss_with_finite_gradients_at_identical_images(model):
    metric = LipSimDistance(model)
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    loss = metric(x, x.detach().clone())  # d = 0: LPIPS's square root gives NaN here
    loss.backward()
    assert float(loss.detach()) < 1e-6 and torch.isfinite(x.grad).all()
    y = torch.rand(2, 3, 224, 224, requires_grad=True)
    z = torch.rand(2, 3, 224, 224)
    metric(y, z).backward()
    assert torch.isfinite(y.grad).all() and float(y.grad.abs().sum()) > 0
    assert all(not t.requires_grad for t in (metric.total_distance, metric.count))  # no graph kept


def test_normalize_false_takes_minus_one_to_one_and_any_size_is_resized(model):
    x, y = _batches(2, size=96)
    plain = LipSimDistance(model, reduction="none")(x, y)
    shifted = LipSimDistance(model, reduction="none", normalize=False)(x * 2 - 1, y * 2 - 1)
    assert torch.allclose(plain, shifted, atol=1e-5)
    want = model(lipsim.preprocess(x), lipsim.preprocess(y))
    assert torch.allclose(plain, want, atol=1e-6)


def test_bad_arguments_and_inputs(model):
    with pytest.raises(ValueError, match="reduction"):
        LipSimDistance(model, reduction="max")
    with pytest.raises(ValueError, match="normalize"):
        LipSimDistance(model, normalize="yes")
    metric = LipSimDistance(model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(torch.full((1, 3, 224, 224), 2.0), torch.rand(1, 3, 224, 224))
    with pytest.raises(ValueError, match="hold 2 and 1"):
        metric.update(torch.rand(2, 3, 224, 224), torch.rand(1, 3, 224, 224))


def test_train_mode_keeps_the_network_in_eval(model):
    metric = LipSimDistance(model)
    metric.train()
    assert metric.training and not metric.model.training


def test_images_in_minus_one_to_one_point_at_normalize_false():
    metric = LipSimDistance(lipsim.create_model("tiny", seed=0))
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # LPIPS's range
    with pytest.raises(ValueError, match="normalize=False"):
        metric(x, x)
    assert torch.isfinite(LipSimDistance(lipsim.create_model("tiny", seed=0), normalize=False)(x, x))
