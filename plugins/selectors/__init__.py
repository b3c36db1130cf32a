"""Layer selectors (kl-greedy-add, kl-greedy-remove, mse-greedy-add, uniform, random)."""
from __future__ import annotations

import math
from collections.abc import Mapping

from hybridize.errors import HybridizeError


def check_raw(selector: str, raw: Mapping[int, float], n_layers: int) -> dict[int, float]:
    """The scorer's raw values as ``{layer: float}`` for exactly the layers 0..n_layers-1.

    Args:
        selector: the selector's registered name (for the error message).
        raw: layer -> raw score from the scorer.
        n_layers: the teacher's number of layers.

    Raises:
        HybridizeError: a layer is missing or out of range, or a value is NaN.
    """
    out = {int(layer): float(value) for layer, value in raw.items()}
    missing = sorted(set(range(n_layers)) - set(out))
    extra = sorted(set(out) - set(range(n_layers)))
    if missing or extra:
        raise HybridizeError(
            f"selector {selector!r} needs a raw score for every layer 0..{n_layers - 1}; "
            f"got missing layers {missing} and out-of-range layers {extra}"
        )
    nan = [layer for layer, value in sorted(out.items()) if math.isnan(value)]
    if nan:
        raise HybridizeError(
            f"selector {selector!r} got NaN raw scores for layers {nan}; a probe diverged "
            "(lower the probe learning rate or check the data)"
        )
    return out
