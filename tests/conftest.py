import os

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
