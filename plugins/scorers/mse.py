"""mse: a layer's score is its held-out stage-1 alignment residual (how badly linear attention fits it)."""
from __future__ import annotations

from typing import Literal

import attrs

from hybridize import hookimpl
from hybridize.plugins.scorers import check_layers, require
from hybridize.selection.contract import ScoreContext


@attrs.frozen(kw_only=True)
class MSEScorerConfig:
    """Options of the mse scorer (none yet)."""


class MSEScorer:
    """``stage1_residuals()`` restricted to ``ctx.layers``.

    Args:
        config: a :class:`MSEScorerConfig`.
    """

    requires: Literal["probe", "stage1"] = "stage1"

    def __init__(self, config: MSEScorerConfig):
        self.config = config

    def __call__(self, ctx: ScoreContext) -> dict[int, float]:
        """Stage-1 residual of each requested layer.

        Raises:
            HybridizeError: the context has no ``stage1_residuals``, or it lacks a requested layer.
        """
        require("mse", "stage1", ctx, ("stage1_residuals",))
        residuals = ctx.stage1_residuals()
        check_layers("mse", "stage-1 residual", residuals, ctx.layers)
        return {int(l): float(residuals[l]) for l in ctx.layers}


def mse_scorer(config: MSEScorerConfig) -> MSEScorer:
    """Factory of ``mse``."""
    return MSEScorer(config)


@hookimpl
def hybridize_register_scorers(register) -> None:
    """Register ``mse``."""
    register("mse", mse_scorer, MSEScorerConfig, capabilities=frozenset({"stage1"}))
