"""Per-window checkpoints of a selection: every probe, the data position, the stop state.

Each evaluation window ends with one checkpoint (:func:`window_state`). With a checkpoint
directory it goes to disk through :class:`hybridize.selection.fanout.ProbeCheckpoints` (one
file, or one per rank); without one only the last is kept, in memory, as the state a diverged
probe restarts from. What each probe contributes is its own :meth:`ProbeRun.state_dict`.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import attrs

from hybridize.selection.probes import ProbeRun
from hybridize.training.loop import rng_state


def window_state(runs: list[ProbeRun], *, step: int, done: bool, stop_step: int | None, sampler: Any, trajectory: list,
                 stop: Any, tokens: dict[str, int], probe_status: dict[int, dict[str, Any]],
                 seconds: list[float] | None = None) -> dict[str, Any]:
    """The checkpoint at the end of a window (RNG states taken now; ``seconds``: the selection's wall clock per window)."""
    return {"step": step, "done": done, "stop_step": stop_step, "sampler": sampler.state_dict(), "seconds": list(seconds or []),
            "trajectory": trajectory, "stop": stop.state_dict(), "tokens": tokens, "rng": rng_state(),
            "probe_status": {str(l): rec for l, rec in probe_status.items()},
            "probes": {r.layer: r.state_dict() for r in runs}}


@attrs.define
class WindowCheckpoints:
    """Where window checkpoints go: ``files`` (a ProbeCheckpoints, or None: the last one in memory)."""

    files: Any = None
    _memory: dict[str, Any] | None = None

    def save(self, state: dict[str, Any]) -> None:
        if self.files is None:
            self._memory = copy.deepcopy(state)
        else:
            self.files.save(state)  # this rank's probes

    def load(self, plan: Sequence[int]) -> dict[str, Any] | None:
        """The newest checkpoint (None without files or when there is none yet)."""
        return self.files.load(plan) if self.files is not None else None

    def restore(self, run: ProbeRun) -> int:
        """Put a probe back to the last checkpoint (model, optimizer, schedule); returns its step."""
        if self.files is not None:
            step, saved = self.files.probe_state(run.layer)
            run.load_state_dict(saved)
            return step
        state = self._memory
        run.load_state_dict(state["probes"][run.layer])
        return state["step"]
