import random
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def shared_dataset(name: str) -> Path:
    """The directory of a real dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not (path / "trn.json").is_file():
        pytest.skip(f"real data not found: {path} (the ../shared checkout is absent)")
    return path


@pytest.fixture
def debian_tags() -> Path:
    return shared_dataset("debian-tags")


@pytest.fixture
def debian_deps() -> Path:
    return shared_dataset("debian-deps")
