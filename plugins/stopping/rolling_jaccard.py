"""rolling-jaccard: stop once the top-K set has settled over the last R evaluation windows.

The rule of arXiv 2512.20569: over the last ``windows`` top-K sets, stop when the backbone
(their intersection) has at least K-1 layers and their mean pairwise Jaccard similarity is at
least ``threshold``. Never before ``max(windows, min_windows)`` windows have been seen.
"""
from __future__ import annotations

from typing import Any

import attrs

from hybridize import hookimpl
from hybridize.errors import HybridizeError
from hybridize.plugins.stopping import check_k
from hybridize.selection.contract import mean_pairwise_jaccard

_v = attrs.validators
#: slack on the Jaccard threshold for float rounding of exact fractions (e.g. a mean of exactly 0.9)
_EPS = 1e-12


@attrs.frozen(kw_only=True)
class RollingJaccardConfig:
    """Options of rolling-jaccard.

    Args:
        windows: R, the number of most recent top-K sets compared (>= 2).
        threshold: the mean pairwise Jaccard the last R sets must reach, in (0, 1].
        min_windows: never stop before this many windows (in addition to R).
    """

    windows: int = attrs.field(default=10, validator=[_v.instance_of(int), _v.ge(2)])
    threshold: float = attrs.field(default=0.9, validator=[_v.gt(0.0), _v.le(1.0)])
    min_windows: int = attrs.field(default=0, validator=[_v.instance_of(int), _v.ge(0)])


class RollingJaccard:
    """Keeps the history of top-K sets and applies the backbone + mean-Jaccard rule.

    Args:
        config: a :class:`RollingJaccardConfig`.
        k: the budget K (the backbone must keep K-1 layers).
    """

    def __init__(self, config: RollingJaccardConfig, *, k: int):
        self.config, self.k = config, check_k("rolling-jaccard", k)
        self._history: list[frozenset[int]] = []

    @property
    def history(self) -> list[frozenset[int]]:
        """The top-K sets recorded so far, oldest first (a copy)."""
        return list(self._history)

    def update(self, top_k: frozenset[int]) -> bool:
        """Record this window's top-K set; True when the last R sets have settled."""
        top = frozenset(int(l) for l in top_k)
        if len(top) != self.k:
            raise HybridizeError(f"stop_criterion 'rolling-jaccard' expects a top-K set of K = {self.k} layers; got {sorted(top)}")
        self._history.append(top)
        return self.settled()

    def settled(self) -> bool:
        """Whether the rule holds on the current history."""
        cfg = self.config
        if len(self._history) < max(cfg.windows, cfg.min_windows):
            return False
        last = self._history[-cfg.windows :]
        backbone = frozenset.intersection(*last)
        return len(backbone) >= self.k - 1 and mean_pairwise_jaccard(last) >= cfg.threshold - _EPS

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "history": [sorted(s) for s in self._history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["k"]) != self.k:
            raise HybridizeError(
                f"stop_criterion 'rolling-jaccard' state was saved with K = {state['k']}; this selection has K = {self.k}"
            )
        self._history = [frozenset(int(l) for l in s) for s in state["history"]]


def rolling_jaccard(config: RollingJaccardConfig, *, k: int) -> RollingJaccard:
    """Factory of ``rolling-jaccard``."""
    return RollingJaccard(config, k=k)


@hookimpl
def hybridize_register_stop_criteria(register) -> None:
    """Register ``rolling-jaccard``."""
    register("rolling-jaccard", rolling_jaccard, RollingJaccardConfig, capabilities=frozenset({"early-stop", "resumable"}))
