"""Shared fixtures. Tests never reach a model hub; the real data of ../shared/data is optional."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real MNIST, CIFAR-10, PACS, weights); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: this test needs the real data")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """Tiny models on a busy 2-core box train ~4x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
