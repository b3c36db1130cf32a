"""Layer scorers: kl (held-out KL of probe students) and mse (stage-1 alignment residual)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hybridize.errors import HybridizeError


def require(scorer: str, requires: str, ctx: Any, fields: Iterable[str]) -> None:
    """Raise a :class:`HybridizeError` naming every ``ScoreContext`` field the scorer needs but got None for."""
    absent = [f for f in fields if getattr(ctx, f, None) is None]
    if absent:
        raise HybridizeError(
            f"scorer {scorer!r} needs score context field(s) {', '.join(repr(f) for f in absent)}; got None. "
            f"It scores {requires} results: use it with a selector that trains them"
        )


def check_layers(scorer: str, what: str, have: Iterable[int], layers: Iterable[int]) -> None:
    """Raise when some of ``layers`` are absent from ``have`` (the probes or residuals on offer)."""
    missing = sorted(set(layers) - set(have))
    if missing:
        raise HybridizeError(f"scorer {scorer!r} has no {what} for layers {missing}; got {what} for {sorted(have)}")
