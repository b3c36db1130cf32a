"""uniform: evenly spaced softmax layers, the standard interleaving baseline.

The L layers are cut into K equal groups and the last layer of each group stays softmax:
``{round((j + 1) * L / K) - 1 for j in range(K)}`` (e.g. L=28, K=7 -> 3, 7, ..., 27), with
Python's round (half to even) on exact fractions.
"""
from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import attrs

from hybridize import hookimpl
from hybridize.errors import HybridizeError
from hybridize.selection.contract import Needs, Probe


@attrs.frozen(kw_only=True)
class UniformConfig:
    """Options of uniform (none yet)."""


def uniform_layers(n_layers: int, k: int) -> list[int]:
    """The last layer of each of ``k`` equal groups of ``n_layers`` layers, sorted."""
    if not 1 <= k <= n_layers:
        raise HybridizeError(f"selector 'uniform' needs 1 <= K <= {n_layers} (the number of layers); got K = {k!r}")
    return [round(Fraction((j + 1) * n_layers, k)) - 1 for j in range(k)]


class Uniform:
    """Importance that puts the evenly spaced layers of :func:`uniform_layers` on top.

    Chosen layers score ``1 + (n_layers - l) / n_layers**2`` (all above 1, the earlier layer first);
    the others score ``-distance / n_layers`` to the nearest chosen layer (all below 0).

    Args:
        config: a :class:`UniformConfig`.
        seed: unused.
    """

    needs: Needs = "none"
    default_scorer: str | None = None

    def __init__(self, config: UniformConfig, *, seed: int = 0):
        self.config, self.seed = config, seed

    def plan(self, n_layers: int) -> list[Probe]:
        """No probes."""
        return []

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """Evenly spaced layers at budget ``k`` first; ``raw`` is ignored."""
        chosen = uniform_layers(n_layers, k)
        out = {}
        for l in range(n_layers):
            dist = min(abs(l - c) for c in chosen)
            out[l] = 1.0 + (n_layers - l) / n_layers**2 if dist == 0 else -dist / n_layers
        return out


def uniform(config: UniformConfig, *, seed: int) -> Uniform:
    """Factory of ``uniform``."""
    return Uniform(config, seed=seed)


@hookimpl
def hybridize_register_selectors(register) -> None:
    """Register ``uniform``."""
    register("uniform", uniform, UniformConfig, capabilities=frozenset())
