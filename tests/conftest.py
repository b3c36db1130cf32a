from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared beside the checkout: real teachers and data (absent on a user's machine)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def pm(hybridize_pm):
    """A fresh plugin manager with the installed plugins (built-ins included)."""
    return hybridize_pm


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared (real teachers and data) is not beside this checkout")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and a shared 2-core CI box only contends with more."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
