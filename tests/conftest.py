import contextlib
import importlib
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny():
    import lipsim

    return lipsim.create_model("tiny", seed=0)


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(1)
    return torch.rand((4, 3, 224, 224), generator=gen)


@contextlib.contextmanager
def importable_module(folder, name: str, source: str):
    """Writes ``source`` as ``folder/name.py`` and imports it (for ``py:name:build`` teachers in
    in-process and subprocess runs); yields ``(module, folder)`` and forgets the module after."""
    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(name), folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)


def published_file(model, path, duplicate=True):
    """Writes ``model`` in the published training-checkpoint layout (docs/method.md §9)."""
    state = {}
    for key, value in model.backbone.state_dict().items():
        state[f"module.model.{key}"] = value.clone()
        if duplicate:
            part, idx, name = key.split(".", 2)
            base = {"convs": "base.1", "linear": "base.2"}[part]
            state[f"module.model.{base}.{idx}.{name}"] = value.clone()
    torch.save(
        {
            "epoch": 3,
            "global_step": 435,
            "model_state_dict": state,
            "optimizer_state_dict": {"state": {}, "param_groups": []},
        },
        path,
    )


#: source of a fake teacher module (``build()``: a frozen random conv net, 16 unit-norm dimensions;
#: ``FakeTeacher(fail_after=n)`` raises after n calls), written to disk by the training tests
FAKE_TEACHER = '''
import torch
from torch import nn


class FakeTeacher(nn.Module):
    """A frozen random conv net with the teacher interface: (B, 3, H, W) in [0, 1] -> (B, 16), unit norm."""

    name = "fake"
    dim = 16

    def __init__(self, fail_after=None):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.proj = nn.Linear(8 * 4 * 4, self.dim)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.zero_()
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) * 0.1)
            self.proj.bias.zero_()
        self.requires_grad_(False)
        self.fail_after = fail_after
        self.calls = 0

    @property
    def device(self):
        return self.conv.weight.device

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("injected failure")
        h = torch.relu(self.conv(x))
        e = self.proj(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))
        return e / e.norm(dim=1, keepdim=True)


def build():
    return FakeTeacher()
'''


def subprocess_env(folder, **extra) -> dict:
    """The environment of a test subprocess: one thread, ``folder`` first on PYTHONPATH, no
    torchrun variables inherited, plus ``extra``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
