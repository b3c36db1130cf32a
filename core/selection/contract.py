"""Layer selection: the protocols of selectors, scorers and stop criteria, and the pure helpers.

A selection is split in two, as the paper's methods are:

1. *scoring* (expensive): a :class:`Scorer` rates each layer, either from briefly trained probe
   students (``requires == "probe"``: e.g. the held-out KL of "all-linear but layer l softmax"),
   from the shared stage-1 alignment (``requires == "stage1"``: e.g. each layer's residual), or
   from the teacher alone (``requires == "teacher"``: a few passes over held-out blocks, e.g. a
   gradient sensitivity or the attention entropy of each layer);
2. *choosing* (pure, deterministic): a :class:`LayerSelector` turns the raw scores into an
   importance per layer (higher = keep softmax); :func:`choose` keeps the top K, optionally kept
   apart by a :class:`ChoiceConfig` (minimum gap, penalty on nearby picks).

The engine (:mod:`hybridize.selection.engine`) runs the scoring at every evaluation window, so a
:class:`StopCriterion` can end the probes early once the top-K set has settled.

Factories registered by plugins:
    selector:       ``factory(config, *, seed) -> LayerSelector``
    scorer:         ``factory(config) -> Scorer``
    stop_criterion: ``factory(config, *, k) -> StopCriterion``
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from hybridize.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

Needs = Literal["probes", "stage1", "teacher", "none"]


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
        heldout_kl: model -> held-out KL(teacher || model) on the shared held-out blocks; the
            reference is the unmodified teacher, computed before any scorer runs.
        stage1_residuals: () -> layer -> held-out stage-1 alignment residual (``requires == "stage1"``).
        teacher: the frozen teacher (``requires == "teacher"``, and stage-1 scorers that run it).
        stage1_modules: layer -> the linear-attention module fitted by the shared stage 1.
        heldout: held-out token batches, each ``(B, T)`` on the CPU (the blocks ``heldout_kl`` uses).
        device: where the teacher runs.
        spend: ``spend(kind, tokens)`` counts the tokens a scorer pushes through a network;
            ``kind`` is ``"teacher_forward"``, ``"teacher_backward"`` or ``"eval_forward"`` (a
            modified model's forward). ``heldout_kl`` counts its own.
    """

    layers: list[int]
    probes: Mapping[int, nn.Module] | None = None
    heldout_kl: Callable[[nn.Module], float] | None = None
    stage1_residuals: Callable[[], dict[int, float]] | None = None
    teacher: nn.Module | None = None
    stage1_modules: Mapping[int, nn.Module] | None = None
    heldout: Sequence[torch.Tensor] | None = None
    device: torch.device | None = None
    spend: Callable[[str, int], None] = lambda kind, tokens: None


class Scorer(Protocol):
    """Rates layers; the raw value's meaning is the scorer's (KL, residual, ...)."""

    requires: Literal["probe", "stage1", "teacher"]

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


@attrs.frozen(kw_only=True)
class ChoiceConfig:
    """Distance regularisation of the top-K choice: options that every selector takes besides its own.

    Given as selector params, e.g. ``selector: {name: kl-greedy-add, min_gap: 2}``. The layers are
    picked greedily by importance; a candidate must keep ``min_gap`` to every chosen layer and leave
    room for the remaining picks, and loses ``gap_penalty`` for nearby chosen layers. With the
    defaults the choice is the plain top K.

    Args:
        min_gap: any two selected layers are at least this many layers apart (1 = no constraint,
            2 = never two adjacent layers). K layers of L fit only if ``(L - 1) // min_gap + 1 >= K``.
        gap_penalty: each chosen layer at distance d <= ``gap_radius`` from a candidate lowers the
            candidate's importance by ``gap_penalty * spread * (gap_radius + 1 - d) / gap_radius``,
            where spread = max - min of the finite importances, so the penalty is in units of the
            selector's own score range (1 = an adjacent pick costs the whole range). 0 = off.
        gap_radius: how far the penalty reaches (1 = adjacent layers only).
    """

    min_gap: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    gap_penalty: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    gap_radius: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    @property
    def active(self) -> bool:
        return self.min_gap > 1 or self.gap_penalty > 0

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults (empty: the plain top K)."""
        default = ChoiceConfig()
        return {f.name: getattr(self, f.name) for f in attrs.fields(ChoiceConfig) if getattr(self, f.name) != getattr(default, f.name)}

    def check(self, n_layers: int, k: int, selector: str) -> None:
        """Raise a :class:`ConfigError` when K layers cannot be ``min_gap`` apart among ``n_layers``."""
        room = (n_layers - 1) // self.min_gap + 1
        if k > room:
            raise ConfigError(
                f"selector {selector!r} field 'min_gap' must leave room for K={k} softmax layers among {n_layers} "
                f"(min_gap={self.min_gap} fits at most {room}); got {self.min_gap}. Lower min_gap to at most "
                f"{max(1, (n_layers - 1) // max(1, k - 1))} or K to at most {room}"
            )


#: selector params that configure the choice (:class:`ChoiceConfig`), not the selector itself
CHOICE_FIELDS = tuple(f.name for f in attrs.fields(ChoiceConfig))


def split_selector_params(name: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], ChoiceConfig]:
    """Split a selector's params into its own and the :class:`ChoiceConfig` ones (validated)."""
    from hybridize.registry.configs import build_config

    own = {k: v for k, v in params.items() if k not in CHOICE_FIELDS}
    choice = build_config(ChoiceConfig, {k: v for k, v in params.items() if k in CHOICE_FIELDS}, context=f"selector {name!r}")
    return own, choice


def build_selector_configs(entry: Any, params: Mapping[str, Any]) -> tuple[Any, ChoiceConfig]:
    """(the selector's own config, its choice options) from user params; all problems in one :class:`ConfigError`."""
    problems: list[str] = []
    own = {k: v for k, v in params.items() if k not in CHOICE_FIELDS}
    config = choice = None
    try:
        config = entry.build_config(own)
    except ConfigError as exc:
        problems += exc.problems
    try:
        _, choice = split_selector_params(entry.name, params)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return config, choice


def _room(layers: Sequence[int], chosen: Iterable[int], min_gap: int) -> int:
    """How many more of ``layers`` fit ``min_gap`` apart from ``chosen`` and each other (greedy from the left, optimal)."""
    placed = list(chosen)
    count = 0
    for l in layers:
        if all(abs(l - p) >= min_gap for p in placed):
            placed.append(l)
            count += 1
    return count


def choose(importance: Mapping[int, float], k: int, choice: ChoiceConfig | None = None) -> list[int]:
    """The K softmax layers (sorted): the top K by importance, kept apart as ``choice`` says.

    Greedy: repeatedly take the candidate with the highest penalised importance (ties: the lower
    index) among those ``min_gap`` away from every chosen layer that still leave room for the
    remaining picks. Without ``choice`` (or with its defaults) this is ``sorted(rank(importance)[:k])``.

    Raises:
        HybridizeError: the scored layers cannot hold K picks ``min_gap`` apart (e.g. failed probes left too few).
    """
    from hybridize.errors import HybridizeError

    if choice is None or not choice.active:
        return sorted(rank(importance)[:k])
    layers = sorted(importance)
    if _room(layers, (), choice.min_gap) < k:
        raise HybridizeError(f"cannot choose K={k} layers min_gap={choice.min_gap} apart among the scored layers {layers}")
    finite = [v for v in importance.values() if math.isfinite(v)]
    spread = (max(finite) - min(finite)) if finite else 0.0
    unit = choice.gap_penalty * (spread or 1.0)
    picked: list[int] = []
    for _ in range(k):
        best: tuple[float, int] | None = None
        for l in layers:
            if l in picked or any(abs(l - p) < choice.min_gap for p in picked):
                continue
            if _room(layers, [*picked, l], choice.min_gap) < k - len(picked) - 1:
                continue
            near = sum(max(0, choice.gap_radius + 1 - abs(l - p)) / choice.gap_radius for p in picked)
            score = importance[l] - unit * near if near else importance[l]
            if best is None or (-score, l) < (-best[0], best[1]):
                best = (score, l)
        picked.append(best[1])  # a candidate always exists: the room check above and at every pick
    return sorted(picked)


def spearman(a: Mapping[int, float], b: Mapping[int, float]) -> float | None:
    """Spearman rank correlation of two per-layer score tables over their common layers (ties: mean ranks).

    Returns None when fewer than two layers are shared or one table is constant.
    """
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    ra, rb = _ranks([a[l] for l in common]), _ranks([b[l] for l in common])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
