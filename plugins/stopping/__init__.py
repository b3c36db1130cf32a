"""Stop criteria of a selection: fixed-budget (never early) and rolling-jaccard (the paper's rule)."""
from __future__ import annotations

from hybridize.errors import ConfigError


def check_k(criterion: str, k: object) -> int:
    """K as an int >= 1, or a :class:`ConfigError` naming the criterion."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"stop_criterion {criterion!r} needs the budget K to be an int >= 1; got {k!r}")
    return k
