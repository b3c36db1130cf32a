"""Layer selection: the protocols of selectors, scorers and stop criteria, and the pure helpers.

A selection is split in two, as the paper's methods are:

1. *scoring* (expensive): a :class:`Scorer` rates each layer, either from briefly trained probe
   students (``requires == "probe"``: e.g. the held-out KL of "all-linear but layer l softmax")
   or from the shared stage-1 alignment (``requires == "stage1"``: e.g. each layer's residual);
2. *choosing* (pure, deterministic): a :class:`LayerSelector` turns the raw scores into an
   importance per layer (higher = keep softmax); :func:`rank` orders the layers and the top K
   stay softmax.

The engine (:mod:`hybridize.select`) runs the scoring at every evaluation window, so a
:class:`StopCriterion` can end the probes early once the top-K set has settled.

Factories registered by plugins:
    selector:       ``factory(config, *, seed) -> LayerSelector``
    scorer:         ``factory(config) -> Scorer``
    stop_criterion: ``factory(config, *, k) -> StopCriterion``
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from hybridize.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

Needs = Literal["probes", "stage1", "none"]


@attrs.frozen
class Probe:
    """One probe student: the softmax layers it keeps and the layer its score rates."""

    layer: int
    softmax_layers: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"layer{self.layer}"


@attrs.define
class ScoreContext:
    """What a scorer may look at during one evaluation window.

    Attributes:
        layers: the layers to score.
        probes: layer -> probe student (scorers with ``requires == "probe"``).
        heldout_kl: model -> held-out KL(teacher || model) on the shared held-out blocks.
        stage1_residuals: () -> layer -> held-out stage-1 alignment residual (``requires == "stage1"``).
    """

    layers: list[int]
    probes: Mapping[int, nn.Module] | None = None
    heldout_kl: Callable[[nn.Module], float] | None = None
    stage1_residuals: Callable[[], dict[int, float]] | None = None


class Scorer(Protocol):
    """Rates layers; the raw value's meaning is the scorer's (KL, residual, ...)."""

    requires: Literal["probe", "stage1"]

    def __call__(self, ctx: ScoreContext) -> dict[int, float]: ...


class LayerSelector(Protocol):
    """Plans the probes it needs and maps raw scores to importance (higher = keep softmax)."""

    needs: Needs
    default_scorer: str | None

    def plan(self, n_layers: int) -> list[Probe]:
        """The probes to train (empty unless ``needs == "probes"``)."""
        ...

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """Importance of every layer 0..n_layers-1 from the scorer's raw values (empty when ``needs == "none"``)."""
        ...


class StopCriterion(Protocol):
    """Decides, at each evaluation window, whether the scoring may stop."""

    def update(self, top_k: frozenset[int]) -> bool:
        """Record this window's top-K set; True when the selection may stop now."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rank(importance: Mapping[int, float]) -> list[int]:
    """Layers by importance, highest first; ties go to the lower layer index (deterministic)."""
    return sorted(importance, key=lambda layer: (-importance[layer], layer))


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    return 1.0 if not (a | b) else len(a & b) / len(a | b)


def mean_pairwise_jaccard(sets: Sequence[Iterable[int]]) -> float:
    """Mean Jaccard over all pairs of ``sets`` (1.0 for fewer than two)."""
    pairs = list(itertools.combinations([set(s) for s in sets], 2))
    return 1.0 if not pairs else sum(jaccard(a, b) for a, b in pairs) / len(pairs)


def resolve_budget(value: int | float | Sequence[int], n_layers: int) -> int:
    """K from ``softmax_layers``: an int K, or a ratio in (0, 1) -> round(ratio * L), at least 1.

    Raises:
        ConfigError: K <= 0 or K >= n_layers (nothing to select), naming the field.
    """
    if isinstance(value, (list, tuple)):
        k = len(value)
    elif isinstance(value, float) and 0 < value < 1:
        k = max(1, round(value * n_layers))
    elif isinstance(value, int) and not isinstance(value, bool):
        k = value
    else:
        raise ConfigError(f"run field 'softmax_layers' must be an int K, a ratio in (0, 1) or a list; got {value!r}")
    if not 1 <= k < n_layers:
        raise ConfigError(
            f"run field 'softmax_layers' must give 1 <= K < {n_layers} (the teacher has {n_layers} layers); "
            f"got {value!r} (K = {k})"
        )
    return k
