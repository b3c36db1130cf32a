"""pytest plugin shipped with hybridize (``pytest11`` entry point): fixtures for plugin tests.

Importing this module must stay cheap: it is loaded by every pytest run in an environment
where hybridize is installed. Heavy imports happen inside the fixtures.
"""
from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def hybridize_pm() -> Any:
    """A fresh plugin manager with the installed plugins; register test plugins on it freely."""
    from hybridize.registry.manager import get_plugin_manager

    return get_plugin_manager()


@pytest.fixture
def hybridize_bare_pm() -> Any:
    """A fresh plugin manager with no plugins at all (entry points not loaded)."""
    from hybridize.registry.manager import get_plugin_manager

    return get_plugin_manager(autoload=False)


@pytest.fixture
def tiny_model() -> Any:
    """Factory: ``tiny_model(family="llama", n_layer=4, d=32, ...)`` -> a random CPU causal LM."""
    from hybridize.testing.models import tiny_model as build

    return build


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
