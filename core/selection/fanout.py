"""Probes fanned out over ranks: which rank runs which probe, their per-rank checkpoints, the gathered windows.

Probe ``i`` of the selector's plan runs on rank ``i mod N`` (:func:`probes_per_rank`); after every
evaluation window the scores are all-gathered (:func:`gather_window`), so every rank records the
same trajectory. Every rank checkpoints its own probes (:class:`ProbeCheckpoints`).
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from hybridize.atomic_io import atomic_torch_save, forget_checkpoint
from hybridize.training.checkpoints import load_checkpoint
from hybridize.training.parallel import SINGLE, Dist

_RANK_DIR = re.compile(r"rank(\d+)-of-(\d+)$")
_STEP_FILE = re.compile(r"probes-(\d+)\.pt$")


@attrs.define
class ProbeCheckpoints:
    """Where a selection's probes are checkpointed.

    One process writes ``DIR/probes.pt`` (every probe). With N ranks, rank r writes its own probes
    to ``DIR/rank{r}-of-{N}/probes-{step}.pt`` at every evaluation window; its older windows are
    deleted only after every rank has written the new one (a barrier), so a kill at any moment
    leaves a step that every rank has. Resume takes the newest step that some layout holds
    completely, so a run may also resume with another number of ranks: each rank reads its probes
    from whichever files hold them.

    Args:
        root: the selection's checkpoint directory.
        par: this process's place in the job.
    """

    root: Path
    par: Dist = SINGLE
    _where: dict[int, Path] = attrs.field(factory=dict)  # layer -> the file with its last checkpoint

    def _own_dir(self) -> Path:
        return self.root / f"rank{self.par.rank}-of-{self.par.world}"

    def path(self, step: int) -> Path:
        return self.root / "probes.pt" if not self.par.active else self._own_dir() / f"probes-{step:08d}.pt"

    def save(self, state: dict[str, Any]) -> Path:
        """Write this rank's probes at ``state["step"]``, then drop what no rank needs any more."""
        path = self.path(state["step"])
        atomic_torch_save(state, path)
        self._where = dict.fromkeys(state["probes"], path)
        self.par.barrier()  # every rank has this step now
        self._prune(path)
        return path

    def _prune(self, keep: Path) -> None:
        if self.par.active:
            for old in self._own_dir().glob("probes-*.pt"):
                if old != keep:
                    forget_checkpoint(old)
        if not self.par.is_main:
            return
        mine = self._own_dir().name if self.par.active else None
        for d in self.root.glob("rank*-of-*"):
            m = _RANK_DIR.match(d.name)
            if m and d.is_dir() and int(m.group(2)) != self.par.world and d.name != mine:
                shutil.rmtree(d, ignore_errors=True)
        if self.par.active and (self.root / "probes.pt").exists():
            forget_checkpoint(self.root / "probes.pt")

    def _layouts(self, cache: dict[Path, dict[str, Any]]) -> list[tuple[int, int, dict[int, Path]]]:
        """(step, ranks, rank -> file) of every step some layout holds completely (``probes.pt`` is read into ``cache``)."""
        found: dict[tuple[int, int], dict[int, Path]] = {}
        for d in self.root.glob("rank*-of-*"):
            m = _RANK_DIR.match(d.name)
            if not (m and d.is_dir()):
                continue
            r, n = int(m.group(1)), int(m.group(2))
            for f in d.glob("probes-*.pt"):
                s = _STEP_FILE.match(f.name)
                if s:
                    found.setdefault((int(s.group(1)), n), {})[r] = f
        out = [(step, n, files) for (step, n), files in found.items() if len(files) == n and n > 1]
        single = self.root / "probes.pt"
        if single.exists():
            cache[single] = load_checkpoint(single)
            out.append((int(cache[single]["step"]), 1, {0: single}))
        return out

    def load(self, plan: Sequence[int]) -> dict[str, Any] | None:
        """The newest complete checkpoint, with ``probes`` holding this rank's layers; None when there is none.

        Args:
            plan: the layers of the selector's probes, in plan order (probe i ran on rank i mod N).
        """
        found: dict[Path, dict[str, Any]] = {}
        layouts = self._layouts(found)
        if not layouts:
            return None
        step, n, files = max(layouts, key=lambda x: (x[0], x[1] == self.par.world))
        mine = [l for i, l in enumerate(plan) if self.par.owns(i)]
        source = {l: files[plan.index(l) % n] for l in mine}
        cache = {}
        for path in sorted(set(source.values())) or [files[0]]:
            cache[path] = found[path] if path in found else load_checkpoint(path)
        state = dict(next(iter(cache.values())))
        state["probes"] = {l: cache[source[l]]["probes"][l] for l in mine}
        self._where = source
        return state

    def probe_state(self, layer: int) -> tuple[int, dict[str, Any]]:
        """(step, saved state) of one of this rank's probes at its last checkpoint."""
        state = load_checkpoint(self._where.get(layer, self.path(0)))
        return state["step"], state["probes"][layer]


def probes_per_rank(n_probes: int, world: int) -> list[int]:
    """How many of ``n_probes`` probes each rank runs (round robin)."""
    return [len(range(r, n_probes, world)) for r in range(world)]


def gather_window(par: Dist, raw: dict[int, float], status: dict[int, dict], eval_tokens: int,
                  plan: Sequence[int]) -> tuple[dict[int, float], dict[int, dict], int]:
    """Every rank's window: raw scores (in plan order), its probes' status records, its held-out eval tokens (summed)."""
    if not par.active:
        return raw, status, eval_tokens
    merged_raw: dict[int, float] = {}
    merged_status: dict[int, dict] = {}
    parts = par.all_gather((raw, status, eval_tokens))
    for r, s, _ in parts:
        merged_raw.update(r)
        merged_status.update(s)
    return {l: merged_raw[l] for l in plan if l in merged_raw}, merged_status, sum(p[2] for p in parts)
