"""Deterministic fault injection, a testing aid: kill the process or poison a loss at a named point.

Set ``HYBRIDIZE_FAULT`` to one or more comma-separated specs ``POINT[@KEY]:N`` (the N-th time the
point is reached in this process) or ``POINT[@KEY]:N+`` (the N-th time and every time after)::

    HYBRIDIZE_FAULT=probe-step:5 hybridize run cfg.yaml --out o      # SIGKILL at the 5th probe step
    HYBRIDIZE_FAULT=probe-nan@2:1+ hybridize run cfg.yaml --out o    # layer 2's probe loss is NaN, always

Kill points end the process with ``SIGKILL`` (no cleanup, no ``finally``, no flushing), exactly as
``kill -9`` would. Without ``HYBRIDIZE_FAULT`` every call here is a dictionary lookup and nothing
else. docs/reliability.md lists the points and the tests that use them.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

from hybridize.errors import ConfigError

ENV = "HYBRIDIZE_FAULT"

#: point -> where it is reached (kill points unless the name ends in ``-nan``)
POINTS: dict[str, str] = {
    "stage1-step": "after every stage-1 optimizer step (and its checkpoint, when one is due)",
    "stage2-step": "after every stage-2 optimizer step (the final distillation, in `hybridize run`)",
    "stage3-step": "after every stage-3 optimizer step",
    "probe-step": "after one probe's optimizer step, inside an evaluation window (other probes not yet stepped)",
    "probe-group": "after one group of probes finished its window, before the next group trains",
    "probe-window": "after an evaluation window's probe checkpoint is written",
    "selection-done": "after the selection, before the final hybrid is built",
    "checkpoint-write": "after a checkpoint is written to its temporary name, before the rename",
    "save-model": "after the hybrid's weights and tokenizer are written to the temporary directory, before its manifest",
    "save-result": "after OUT/model is in place, before OUT/result.json is written",
    "probe-nan": "(key: layer) the probe's training loss becomes NaN at this step",
}

_hits: Counter[str] = Counter()
_parsed: tuple[str, dict[str, tuple[int, bool]]] | None = None


def _parse(spec: str) -> dict[str, tuple[int, bool]]:
    out: dict[str, tuple[int, bool]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        target, _, count = item.partition(":")
        point = target.split("@", 1)[0]
        repeat = count.endswith("+")
        digits = count[:-1] if repeat else count or "1"
        if point not in POINTS or not digits.isdigit() or int(digits) < 1:
            raise ConfigError(
                f"{ENV} item {item!r} must look like POINT[@KEY]:N or POINT[@KEY]:N+ with N >= 1 and POINT one of "
                f"{', '.join(POINTS)}"
            )
        out[target] = (int(digits), repeat)
    return out


def _specs() -> dict[str, tuple[int, bool]]:
    global _parsed
    spec = os.environ.get(ENV, "")
    if _parsed is None or _parsed[0] != spec:
        _parsed = (spec, _parse(spec) if spec else {})
        _hits.clear()
    return _parsed[1]


def fires(point: str, key: object = None) -> bool:
    """Count one arrival at ``point`` (``point@key`` when a key is given); True when a spec says fail here."""
    specs = _specs()
    if not specs:
        return False
    target = point if key is None else f"{point}@{key}"
    if target not in specs:
        return False
    _hits[target] += 1
    n, repeat = specs[target]
    return _hits[target] == n or (repeat and _hits[target] > n)


def kill_point(point: str) -> None:
    """``kill -9`` this process when ``HYBRIDIZE_FAULT`` names this arrival at ``point``."""
    if fires(point):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
