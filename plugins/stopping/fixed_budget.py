"""fixed-budget: never stop early; the probes run their whole token budget."""
from __future__ import annotations

from typing import Any

import attrs

from hybridize import hookimpl
from hybridize.plugins.stopping import check_k


@attrs.frozen(kw_only=True)
class FixedBudgetConfig:
    """Options of fixed-budget (none)."""


class FixedBudget:
    """Counts the evaluation windows and never asks to stop.

    Args:
        config: a :class:`FixedBudgetConfig`.
        k: the budget K (recorded, unused).
    """

    def __init__(self, config: FixedBudgetConfig, *, k: int):
        self.config, self.k = config, check_k("fixed-budget", k)
        self.windows_seen = 0

    def update(self, top_k: frozenset[int]) -> bool:
        """Count the window; always False."""
        self.windows_seen += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"windows_seen": self.windows_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows_seen = int(state["windows_seen"])


def fixed_budget(config: FixedBudgetConfig, *, k: int) -> FixedBudget:
    """Factory of ``fixed-budget``."""
    return FixedBudget(config, k=k)


@hookimpl
def hybridize_register_stop_criteria(register) -> None:
    """Register ``fixed-budget``."""
    register("fixed-budget", fixed_budget, FixedBudgetConfig, capabilities=frozenset({"resumable"}))
