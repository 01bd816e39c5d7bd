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
