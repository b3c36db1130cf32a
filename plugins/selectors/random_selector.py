"""random: a seeded random ranking of the layers (the control of a selector comparison)."""
from __future__ import annotations

import random
from collections.abc import Mapping

import attrs

from hybridize import hookimpl
from hybridize.selection.contract import Needs, Probe


@attrs.frozen(kw_only=True)
class RandomConfig:
    """Options of random (none: the run's seed decides the ranking)."""


class RandomSelector:
    """Importance = a random permutation of the layers drawn from ``random.Random(seed)``.

    The permutation depends only on the seed and the number of layers (not on K), so the
    top-K sets are nested as K grows and every call gives the same answer.

    Args:
        config: a :class:`RandomConfig`.
        seed: the seed of the permutation.
    """

    needs: Needs = "none"
    default_scorer: str | None = None

    def __init__(self, config: RandomConfig, *, seed: int = 0):
        self.config, self.seed = config, seed

    def plan(self, n_layers: int) -> list[Probe]:
        """No probes."""
        return []

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """Layer ``order[i]`` of the seeded permutation scores ``n_layers - i``; ``raw`` is ignored."""
        order = list(range(n_layers))
        random.Random(self.seed).shuffle(order)
        return {l: float(n_layers - i) for i, l in enumerate(order)}


def random_selector(config: RandomConfig, *, seed: int) -> RandomSelector:
    """Factory of ``random``."""
    return RandomSelector(config, seed=seed)


@hookimpl
def hybridize_register_selectors(register) -> None:
    """Register ``random``."""
    register("random", random_selector, RandomConfig, capabilities=frozenset({"nested", "seeded"}))
