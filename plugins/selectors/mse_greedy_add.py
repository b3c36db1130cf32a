"""mse-greedy-add (GA-S1): keep softmax where the stage-1 linear attention fits the teacher worst.

No probes and no stage 2: the shared stage-1 pass gives each layer's held-out alignment
residual (the ``mse`` scorer), and the layers with the largest residual stay softmax.
"""
from __future__ import annotations

from collections.abc import Mapping

import attrs

from hybridize import hookimpl
from hybridize.plugins.selectors import check_raw
from hybridize.selection.contract import Needs, Probe


@attrs.frozen(kw_only=True)
class MSEGreedyAddConfig:
    """Options of mse-greedy-add (none yet)."""


class MSEGreedyAdd:
    """GA-S1: importance = stage-1 alignment residual of each layer.

    Args:
        config: a :class:`MSEGreedyAddConfig`.
        seed: unused (the choice is a pure function of the residuals).
    """

    needs: Needs = "stage1"
    default_scorer: str | None = "mse"
    name = "mse-greedy-add"

    def __init__(self, config: MSEGreedyAddConfig, *, seed: int = 0):
        self.config, self.seed = config, seed

    def plan(self, n_layers: int) -> list[Probe]:
        """No probes: stage 1 alone scores the layers."""
        return []

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """I(l) = residual(l): the layer the linear attention fits worst ranks first."""
        return check_raw(self.name, raw, n_layers)


def mse_greedy_add(config: MSEGreedyAddConfig, *, seed: int) -> MSEGreedyAdd:
    """Factory of ``mse-greedy-add``."""
    return MSEGreedyAdd(config, seed=seed)


@hookimpl
def hybridize_register_selectors(register) -> None:
    """Register ``mse-greedy-add``."""
    register("mse-greedy-add", mse_greedy_add, MSEGreedyAddConfig, capabilities=frozenset({"nested"}))
