"""kl: a probe's score is its held-out KL(teacher || probe) (stage-2 KL to the teacher)."""
from __future__ import annotations

from typing import Literal

import attrs

from hybridize import hookimpl
from hybridize.plugins.scorers import check_layers, require
from hybridize.selection.contract import ScoreContext


@attrs.frozen(kw_only=True)
class KLScorerConfig:
    """Options of the kl scorer (none yet: the held-out set is the engine's)."""


class KLScorer:
    """``{l: heldout_kl(probes[l]) for l in layers}``.

    Args:
        config: a :class:`KLScorerConfig`.
    """

    requires: Literal["probe", "stage1"] = "probe"

    def __init__(self, config: KLScorerConfig):
        self.config = config

    def __call__(self, ctx: ScoreContext) -> dict[int, float]:
        """Held-out KL of each layer's probe.

        Raises:
            HybridizeError: the context has no probes or no ``heldout_kl``, or lacks a layer's probe.
        """
        require("kl", "probe", ctx, ("probes", "heldout_kl"))
        check_layers("kl", "probe", ctx.probes, ctx.layers)
        return {int(l): float(ctx.heldout_kl(ctx.probes[l])) for l in ctx.layers}


def kl_scorer(config: KLScorerConfig) -> KLScorer:
    """Factory of ``kl``."""
    return KLScorer(config)


@hookimpl
def hybridize_register_scorers(register) -> None:
    """Register ``kl``."""
    register("kl", kl_scorer, KLScorerConfig, capabilities=frozenset({"probe"}))
