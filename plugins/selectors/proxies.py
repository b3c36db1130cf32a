"""Proxy selectors: layers ranked from the teacher alone (or the shared stage 1), no probe training.

The paper's first open question is how to find the important layers without a distillation run
per layer. These selectors rate layers with one of the proxy scorers of
:mod:`hybridize.plugins.scorers.proxies` and keep the top K:

- ``swap-kl``: I(l) = held-out KL when only layer l's attention is swapped for its stage-1 linear
  fit (the shared stage 1, which the final hybrid reuses, plus one forward per layer);
- ``grad-sensitivity``: I(l) = the teacher's first-order loss sensitivity to layer l's attention
  output (one forward and backward of the teacher over the held-out blocks);
- ``attention-entropy``: I(l) = -(normalised attention entropy of layer l): the sharpest
  attention, the hardest for a linear layer to imitate, stays softmax (one teacher forward).
"""
from __future__ import annotations

from collections.abc import Mapping

import attrs

from hybridize import hookimpl
from hybridize.plugins.selectors import check_raw
from hybridize.selection.contract import Needs, Probe


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """Options of the proxy selectors (none of their own; the distance options apply)."""


class ProxySelector:
    """Importance = ``sign`` x the scorer's raw value, for every layer.

    Args:
        name: the registered name (for error messages).
        needs: ``"stage1"`` or ``"teacher"``.
        scorer: the default scorer.
        sign: +1 when a larger raw value means "keep softmax", -1 when a smaller one does.
        config: a :class:`ProxyConfig`.
        seed: unused (the choice is a pure function of the scores).
    """

    def __init__(self, name: str, needs: Needs, scorer: str, sign: float, config: ProxyConfig, *, seed: int = 0):
        self.name, self.needs, self.default_scorer, self.sign = name, needs, scorer, sign
        self.config, self.seed = config, seed

    def plan(self, n_layers: int) -> list[Probe]:
        """No probes."""
        return []

    def importance(self, raw: Mapping[int, float], n_layers: int, k: int) -> dict[int, float]:
        """I(l) = sign x raw(l)."""
        return {l: self.sign * v for l, v in check_raw(self.name, raw, n_layers).items()}


def swap_kl(config: ProxyConfig, *, seed: int) -> ProxySelector:
    """Factory of ``swap-kl``: the layer whose swap hurts most stays softmax."""
    return ProxySelector("swap-kl", "stage1", "swap-kl", 1.0, config, seed=seed)


def grad_sensitivity(config: ProxyConfig, *, seed: int) -> ProxySelector:
    """Factory of ``grad-sensitivity``: the layer the teacher's loss is most sensitive to stays softmax."""
    return ProxySelector("grad-sensitivity", "teacher", "grad-sensitivity", 1.0, config, seed=seed)


def attention_entropy(config: ProxyConfig, *, seed: int) -> ProxySelector:
    """Factory of ``attention-entropy``: the layer with the sharpest attention stays softmax."""
    return ProxySelector("attention-entropy", "teacher", "attention-entropy", -1.0, config, seed=seed)


@hookimpl
def hybridize_register_selectors(register) -> None:
    """Register ``swap-kl``, ``grad-sensitivity`` and ``attention-entropy``."""
    caps = frozenset({"nested", "proxy"})
    register("swap-kl", swap_kl, ProxyConfig, capabilities=caps)
    register("grad-sensitivity", grad_sensitivity, ProxyConfig, capabilities=caps)
    register("attention-entropy", attention_entropy, ProxyConfig, capabilities=caps)
