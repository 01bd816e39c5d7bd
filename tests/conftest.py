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
