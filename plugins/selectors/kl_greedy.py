"""KL-guided greedy selectors of arXiv 2512.20569: kl-greedy-add (GA-S2) and kl-greedy-remove (GR-S2).

Both train one probe per layer and rate it by the held-out KL(teacher || probe) after a short
stage 2 (the ``kl`` scorer):

- add: probe l = "all-linear but l is softmax"; a lower KL means l matters more, I(l) = -KL;
- remove: probe l = "all-softmax but l is linear"; the all-softmax reference has KL 0, so the
  KL itself is the increase caused by linearising l, I(l) = KL.
"""
from __future__ import annotations

from collections.abc import Mapping

import attrs

from hybridize import hookimpl
from hybridize.plugins.selectors import check_raw
from hybridize.selection.contract import Needs, Probe


@attrs.frozen(kw_only=True)
class KLGreedyConfig:
    """Options of kl-greedy-add / kl-greedy-remove (none yet: probe length lives in ``selection``)."""


class KLGreedyAdd:
    """GA-S2: start all-linear, probe each layer alone as softmax, keep the K lowest-KL layers.

    Args:
        config: a :class:`KLGreedyConfig`.
        seed: unused (the choice is a pure function of the scores).
    """

    needs: Needs = "probes"
    default_scorer: str | None = "kl"
    name = "kl-greedy-add"

    def __init__(self, config: KLGreedyConfig, *, seed: int = 0):
        self.config, self.seed = config, seed

    def plan(self, n_layers: int) -> list[Probe]:
        """One probe per layer: all-linear except that layer."""
        return [Probe(layer=l, softmax_layers=(l,)) for l in range(n_layers)]

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """I(l) = -KL(probe l): the layer that recovers the teacher best alone ranks first."""
        return {l: -v for l, v in check_raw(self.name, raw, n_layers).items()}


class KLGreedyRemove:
    """GR-S2: start all-softmax, probe each layer alone as linear, keep the K highest-KL layers.

    Args:
        config: a :class:`KLGreedyConfig`.
        seed: unused (the choice is a pure function of the scores).
    """

    needs: Needs = "probes"
    default_scorer: str | None = "kl"
    name = "kl-greedy-remove"

    def __init__(self, config: KLGreedyConfig, *, seed: int = 0):
        self.config, self.seed = config, seed

    def plan(self, n_layers: int) -> list[Probe]:
        """One probe per layer: all-softmax except that layer."""
        return [Probe(layer=l, softmax_layers=tuple(i for i in range(n_layers) if i != l)) for l in range(n_layers)]

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """I(l) = KL(probe l) - KL(all-softmax) = KL(probe l): the most harmful removal ranks first."""
        return check_raw(self.name, raw, n_layers)


def kl_greedy_add(config: KLGreedyConfig, *, seed: int) -> KLGreedyAdd:
    """Factory of ``kl-greedy-add``."""
    return KLGreedyAdd(config, seed=seed)


def kl_greedy_remove(config: KLGreedyConfig, *, seed: int) -> KLGreedyRemove:
    """Factory of ``kl-greedy-remove``."""
    return KLGreedyRemove(config, seed=seed)


@hookimpl
def hybridize_register_selectors(register) -> None:
    """Register ``kl-greedy-add`` and ``kl-greedy-remove``."""
    register("kl-greedy-add", kl_greedy_add, KLGreedyConfig, capabilities=frozenset({"nested"}))
    register("kl-greedy-remove", kl_greedy_remove, KLGreedyConfig, capabilities=frozenset({"nested"}))
