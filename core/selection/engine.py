"""The selection engine: one shared stage 1, probes in lockstep on shared teacher passes.

Cost structure (DESIGN.md): stage 1 is layer-local, so one stage-1 pass over an all-linear
student serves every probe (each probe copies its linear layers from it). All probes see the
same batches: each batch's teacher forward runs once and feeds every probe. When the probes do
not fit in memory together, they run in groups per evaluation window, sharing that window's
teacher hidden states (kept on the CPU), so grouping costs no extra teacher passes. Every
window checkpoints all probes, the data position and the stop criterion, so a killed selection
resumes where it stopped.

The package in data-flow order: :mod:`~hybridize.selection.components` (selector, scorer, stop),
this module (shared stage 1, windows of teacher passes, scoring, stop), :mod:`~hybridize.selection.probes`
(a probe, its optimization from :mod:`hybridize.training.loop`, one window's training, the retry on
divergence), :mod:`~hybridize.selection.checkpoints` (the per-window checkpoint).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from hybridize.registry.configs import ComponentRef
from hybridize.training.data import BlockSampler, PackedData
from hybridize.distill.stages import DistillConfig, Distiller, alignment_losses, linear_modules
from hybridize.selection.components import Components, SelectionConfig
from hybridize.selection.checkpoints import WindowCheckpoints, window_state
from hybridize.selection.probes import DivergenceGuard, ProbeBuilder, ProbeDivergedWarning, ProbeRun, train_window
from hybridize.selection.fanout import ProbeCheckpoints, gather_window
from hybridize.training.parallel import SINGLE
from hybridize import faults
from hybridize.errors import HybridizeError
from hybridize.selection.budgets import importance_of, token_report
from hybridize.selection.contract import ScoreContext, choose, jaccard, rank
from hybridize.model.teacher import decoder_layers
from hybridize.training.loop import autocast_for, set_rng_state

__all__ = ["SelectionConfig", "ProbeDivergedWarning", "SelectionEngine", "Components", "ProbeRun"]



@attrs.define(slots=False)
class SelectionEngine:
    """Scores layers for one selection and returns the ranking (see the module docstring).

    Args:
        teacher: the frozen teacher.
        data: packed train / held-out blocks.
        cfg: the selection settings.
        distill: stage budgets (stage 1 and probe learning rates come from here).
        variant: the linear-attention variant of the probes (name, params).
        pm: the plugin manager.
        device: where teacher and probes run.
        ckpt_dir: checkpoint directory (None: no checkpoints).
        seed: seed of data order and of seeded selectors.
    """

    teacher: nn.Module
    data: PackedData
    cfg: SelectionConfig
    distill: DistillConfig
    variant: ComponentRef
    pm: Any
    device: torch.device
    k: int
    ckpt_dir: Path | None = None
    seed: int = 0
    progress: bool = True
    on_window: Any = None  # called with each evaluation window's trajectory record
    on_step: Any = None  # (stage, step, tokens, metrics) after each step of the shared stage 1
    stage1_from: Any = None  # (modules, tokens) of a stage-1 pass already run on this teacher, data and seed
    dist: Any = None  # hybridize.training.parallel.Dist: probes fan out over its ranks, stage 1 runs data parallel
    run_to_budget: bool = False  # train the probes to the whole probe_tokens, noting (not obeying) the stop criterion


    def __attrs_post_init__(self) -> None:
        self.n_layers = len(decoder_layers(self.teacher))
        self.parts = Components.build(self.cfg, self.pm, seed=self.seed, k=self.k)
        self.parts.choice.check(self.n_layers, self.k, self.cfg.selector.name)
        self.par = self.dist or SINGLE
        self.distiller = Distiller(teacher=self.teacher, data=self.data, cfg=self.distill, device=self.device,
                                   ckpt_dir=self.ckpt_dir, seed=self.seed, progress=self.progress, dist=self.dist,
                                   on_step=self.on_step)
        on_disk = self.ckpt_dir is not None and self.cfg.probe_checkpoints == "disk"
        self._windows = WindowCheckpoints(ProbeCheckpoints(self.ckpt_dir, self.par) if on_disk else None)
        self.guard = DivergenceGuard(lr_scale=self.cfg.nan_retry_lr_scale, train=lambda *a: self._train_window(*a),
                                     score=lambda group: self._score_window(group), restore=self._windows.restore)
        self.stage1_modules: dict[int, nn.Module] = {}
        self._park_dir: Path | None = None  # probe_offload disk: where waiting probes' owned states are
        self.stage1_shared = False
        self._stage1_teacher_tokens = 0
        self.trajectory: list[dict[str, Any]] = []
        self.stop_step: int | None = None
        self._t0, self._seconds_before = time.perf_counter(), 0.0  # the selection's wall clock (resume: from its checkpoint)
        self.window_seconds: list[float] = []  # wall seconds of the selection at the end of each window
        self.tokens = {"stage1": 0, "probe_each": 0, "probes_total": 0, "teacher_forward": 0, "teacher_backward": 0, "eval_forward": 0}

    @property
    def probe_status(self) -> dict[int, dict[str, Any]]:
        """layer -> its retried / failed record (kept by the divergence guard)."""
        return self.guard.status

    @probe_status.setter
    def probe_status(self, status: dict[int, dict[str, Any]]) -> None:
        self.guard.status = status

    # -- stage 1, shared --------------------------------------------------------------------------
    def shared_stage1(self) -> dict[int, nn.Module]:
        """Stage 1 once on an all-linear student; its linear modules seed every probe."""
        from hybridize.model.surgery import build_student

        student = build_student(self.teacher, [], self.variant.name, self.variant.params, pm=self.pm).to(self.device)
        self.distiller.stage1(student)
        self.tokens["stage1"] = self.distiller.tokens["stage1"]
        self.tokens["teacher_forward"] += self.distiller.tokens["teacher_forward"]
        self._stage1_teacher_tokens = self.distiller.tokens["teacher_forward"]
        self.stage1_modules = {i: m.requires_grad_(False) for i, m in linear_modules(student).items()}
        self.par.broadcast_module_(nn.ModuleList(self.stage1_modules.values()))  # every rank's probes start equal
        return self.stage1_modules

    def stage1_tokens(self) -> dict[str, int]:
        """What the stage-1 pass cost: student tokens and teacher-forward tokens."""
        return {"stage1": self.tokens["stage1"], "teacher_forward": self._stage1_teacher_tokens}

    def adopt_stage1(self, modules: dict[int, nn.Module], tokens: Mapping[str, int]) -> dict[int, nn.Module]:
        """Start from a stage-1 pass run elsewhere (``hybridize compare`` shares one per seed).

        Its tokens are still counted in this selection's report, so that the report says what
        the selection costs on its own; the caller accounts for the sharing.
        """
        self.stage1_modules = modules
        self.tokens["stage1"] = tokens["stage1"]
        self.tokens["teacher_forward"] += tokens["teacher_forward"]
        self._stage1_teacher_tokens = tokens["teacher_forward"]
        self.stage1_shared = True
        return modules

    @torch.no_grad()
    def stage1_residuals(self) -> dict[int, float]:
        """Held-out stage-1 alignment residual of every layer (the mse scorer's input)."""
        sums = {i: 0.0 for i in self.stage1_modules}
        batches = self.data.heldout[: self.distill.eval_blocks].split(self.distill.micro_batch_size or self.distill.batch_size)
        for b in batches:
            with autocast_for(self.device):
                for i, v in alignment_losses(self.teacher, self.stage1_modules, b.to(self.device)).items():
                    sums[i] += float(v) / len(batches)
            self.tokens["teacher_forward"] += b.numel()
        return sums

    def _heldout_kl(self, model: nn.Module) -> float:
        """Held-out KL(teacher || model) on the shared blocks; counts the model's forward tokens."""
        evaluator = self.distiller.evaluator
        self.tokens["eval_forward"] += sum(b.numel() for b in evaluator.batches)
        return evaluator(model)["heldout_kl"]

    def _spend(self, kind: str, tokens: int) -> None:
        if kind not in ("teacher_forward", "teacher_backward", "eval_forward"):
            raise HybridizeError(f"scorer {self.parts.names['scorer']!r} spent tokens of unknown kind {kind!r}; "
                                 "expected 'teacher_forward', 'teacher_backward' or 'eval_forward'")
        self.tokens[kind] += int(tokens)

    def _context(self) -> ScoreContext:
        """What a stage-1 or teacher-only scorer may use: the teacher, the stage-1 modules, the held-out batches."""
        return ScoreContext(layers=list(range(self.n_layers)), heldout_kl=self._heldout_kl, stage1_residuals=self.stage1_residuals,
                            teacher=self.teacher, stage1_modules=self.stage1_modules or None, heldout=self.distiller.evaluator.batches,
                            device=self.device, spend=self._spend)

    # -- probes -------------------------------------------------------------------------------------
    def _probe_builder(self) -> ProbeBuilder:
        return ProbeBuilder(teacher=self.teacher, stage1_modules=self.stage1_modules, variant=self.variant, pm=self.pm,
                            distill=self.distill, lr_attn=self.cfg.probe_lr_attn or self.distill.stage2_lr_attn,
                            lr_other=self.cfg.probe_lr_other or self.distill.stage2_lr_other, device=self.device,
                            trainable=self.cfg.probe_trainable)

    def _train_window(self, group: list[ProbeRun], batches: list, teacher_h: list) -> dict[int, bool]:
        """The window's optimizer steps for one group (see :func:`hybridize.selection.probes.train_window`)."""
        return train_window(group, batches, teacher_h, self.teacher, self.distill, self.device)

    @torch.no_grad()
    def _teacher_window(self, sampler: BlockSampler, steps: int, keep_on: torch.device, run_teacher: bool = True) -> tuple[list, list]:
        """Draw the window's batches and run the teacher once on each micro-batch (not on a rank without probes)."""
        micro = self.distill.micro_batch_size or self.distill.batch_size
        batches, hidden = [], []
        for _ in range(steps):
            parts = list(self.data.train[sampler.next_indices()].split(micro))
            hs = []
            for ids in parts if run_teacher else []:
                with autocast_for(self.device):
                    hs.append(self.teacher.model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state.to(keep_on))
                self.tokens["teacher_forward"] += ids.numel()
            if not run_teacher:  # the count stays that of one process: the same on every rank
                self.tokens["teacher_forward"] += sum(ids.numel() for ids in parts)
            batches.append(parts)
            hidden.append(hs)
        return batches, hidden

    def _score_window(self, runs: list[ProbeRun], raw: dict[int, float] | None = None) -> dict[int, float]:
        if raw is None:
            probes = {r.layer: r.model for r in runs}
            ctx = ScoreContext(layers=sorted(probes), probes=probes, heldout_kl=self._heldout_kl)
            raw = self.parts.scorer(ctx)
        return raw

    # -- NaN / inf guard --------------------------------------------------------------------------
    def _failed(self) -> set[int]:
        return self.guard.failed()

    def _record_window(self, step: int, tokens: int, raw: dict[int, float]) -> bool:
        importance = importance_of(self.parts.selector, raw, self.n_layers, self.k, self._failed())
        top = choose(importance, self.k, self.parts.choice)
        prev = self.trajectory[-1]["top_k"] if self.trajectory else None
        spent = {"teacher_forward": self.tokens["teacher_forward"], "eval_forward": self.tokens["eval_forward"]}  # so far
        self.window_seconds.append(round(self._seconds_before + time.perf_counter() - self._t0, 3))  # beside: not deterministic
        self.trajectory.append({"step": step, "tokens_per_probe": tokens, "raw": {int(l): float(v) for l, v in raw.items()},
                                "importance": {int(l): float(v) for l, v in importance.items()}, "top_k": top,
                                "jaccard_prev": None if prev is None else jaccard(prev, top), "spent": spent})
        if self.on_window is not None:
            self.on_window(self.trajectory[-1])
        return bool(self.parts.stop.update(frozenset(top)))

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save(self, runs: list[ProbeRun], sampler: BlockSampler, step: int, done: bool) -> None:
        """Checkpoint every probe, the data position and the stop state (kept in memory without ``ckpt_dir``)."""
        self._windows.save(window_state(runs, step=step, done=done, stop_step=self.stop_step, sampler=sampler,
                                        trajectory=self.trajectory, stop=self.parts.stop, tokens=self.tokens,
                                        probe_status=self.probe_status, seconds=self.window_seconds))

    def _load(self, runs: list[ProbeRun], sampler: BlockSampler) -> tuple[int, bool]:
        state = self._windows.load(self._plan)
        if state is None:
            return 0, False
        for r in runs:
            r.load_state_dict(state["probes"][r.layer])
        sampler.load_state_dict(state["sampler"])
        self.parts.stop.load_state_dict(state["stop"])
        set_rng_state(state["rng"])
        self.trajectory, self.stop_step = state["trajectory"], state["stop_step"]
        self.window_seconds = list(state.get("seconds", []))
        if self.window_seconds:
            self._t0, self._seconds_before = time.perf_counter(), self.window_seconds[-1]
        self.tokens = {**self.tokens, **state["tokens"]}
        self.probe_status = {int(l): rec for l, rec in state.get("probe_status", {}).items()}
        return state["step"], state["done"]

    # -- the whole selection ------------------------------------------------------------------------------
    def run_probes(self) -> dict[int, float]:
        """Train every probe in lockstep windows until the stop criterion or the token budget; final raw scores."""
        from tqdm.auto import tqdm

        probes = self.parts.selector.plan(self.n_layers)
        B, T = self.distill.batch_size, self.data.seq_len
        steps = max(1, math.ceil(self.cfg.probe_tokens / (B * T)))
        window = self.cfg.eval_every or max(1, steps // 20)
        self._plan = [p.layer for p in probes]
        runs, groups = self._build_probes(probes, steps)
        on_device = len(groups) == 1
        sampler = BlockSampler(self.data.train.shape[0], B, seed=self.seed)
        step, done = self._load(runs, sampler)
        if step == 0:
            self._save(runs, sampler, 0, False)  # the "last checkpoint" a diverged probe restarts from
        bar = tqdm(total=steps, initial=step, desc=f"probes x{len(runs)}", unit="step", disable=not self.progress)
        while not done and step < steps:
            n = min(window, steps - step)
            batches, hidden = self._teacher_window(sampler, n, self.device if on_device else torch.device("cpu"), bool(runs))
            raw: dict[int, float] = {}
            eval_before = self.tokens["eval_forward"]
            for group in groups:
                if not on_device:
                    for r in group:
                        self._fetch(r)
                raw.update(self.guard.scores(group, step + n, batches, hidden))
                if not on_device:
                    for r in group:
                        self._offload(r)
                faults.kill_point("probe-group")
            raw = self._gather_window(raw, eval_before, runs)
            step += n
            self.tokens["probe_each"] = step * B * T
            stop = self._record_window(step, step * B * T, raw)
            done = (stop and not self.run_to_budget) or step >= steps
            if stop and self.stop_step is None:
                self.stop_step = step
            bar.update(n)
            bar.set_postfix(top_k=self.trajectory[-1]["top_k"])
            self._save(runs, sampler, step, done)
            faults.kill_point("probe-window")
        bar.close()
        if self._park_dir is not None:  # the scratch files of probe_offload: disk, each one written here
            for r in runs:
                (self._park_dir / f"probe-{r.layer}.pt").unlink(missing_ok=True)
            if not any(self._park_dir.iterdir()):
                self._park_dir.rmdir()
            self._park_dir = None
        self.tokens["probes_total"] = self.tokens["probe_each"] * len(probes)
        self.n_probes = len(probes)
        return self.trajectory[-1]["raw"] if self.trajectory else {}

    def _build_probes(self, probes: list, steps: int) -> tuple[list[ProbeRun], list[list[ProbeRun]]]:
        """This rank's probes (probe i on rank i mod N), built one at a time: with several groups each leaves the
        device as soon as it is built, so at most one probe's owned tensors are on the device beyond a group's."""
        builder = self._probe_builder()
        mine = [p for i, p in enumerate(probes) if self.par.owns(i)]
        size = self.cfg.probe_group_size  # the recipes resolve "auto" (hybridize.recipes.plan); unresolved: all at once
        size = (size if isinstance(size, int) else 0) or max(1, len(mine))  # a rank may have no probes
        runs = []
        for probe in mine:
            runs.append(builder.build(probe, steps))
            if size < len(mine):
                self._offload(runs[-1])
        return runs, [runs[i : i + size] for i in range(0, len(runs), size)]

    def _offload(self, run: ProbeRun) -> None:
        """A probe waits for its group's turn in pinned host memory, or on disk (``selection.probe_offload``)."""
        if self.cfg.probe_offload != "disk":
            return run.to(torch.device("cpu"))
        if self._park_dir is None:
            import tempfile

            root = self.ckpt_dir / "parked" if self.ckpt_dir is not None else Path(tempfile.mkdtemp(prefix="hybridize-probes-"))
            root.mkdir(parents=True, exist_ok=True)
            self._park_dir = root
        run.park(self._park_dir / f"probe-{run.layer}.pt")

    def _fetch(self, run: ProbeRun) -> None:
        if run.parked is not None:
            run.unpark(self.device)
        else:
            run.to(self.device)

    def _gather_window(self, raw: dict[int, float], eval_before: int, runs: list[ProbeRun]) -> dict[int, float]:
        """With several ranks: every rank's scores, probe status and held-out tokens of this window, on every rank."""
        mine = {r.layer for r in runs}
        status = {l: rec for l, rec in self.probe_status.items() if l in mine}
        raw, status, evals = gather_window(self.par, raw, status, self.tokens["eval_forward"] - eval_before, self._plan)
        self.probe_status.update(status)
        self.tokens["eval_forward"] = eval_before + evals
        return raw

    def run(self) -> dict[str, Any]:
        """Score, rank and choose; returns the selection record for result.json."""
        needs = self.parts.selector.needs
        self.n_probes = 0
        self._t0 = time.perf_counter()
        torch.manual_seed(self.seed)  # the all-linear student's fresh parameters (gates, output gate, ...)
        if needs in ("probes", "stage1"):
            self.distiller.evaluator.prepare()  # the reference of heldout_kl, before any scorer modifies the teacher
            if self.stage1_from is not None:
                self.adopt_stage1(*self.stage1_from)
            else:
                self.shared_stage1()
        if needs == "probes":
            raw = self.run_probes()
        elif needs in ("stage1", "teacher"):
            raw = self.parts.scorer(self._context())
            self._record_window(0, 0, raw)
        else:
            raw = {}
            self._record_window(0, 0, raw)
        self.tokens["teacher_forward"] += self.distiller.evaluator.teacher_tokens
        final = self.trajectory[-1]
        return {
            "softmax_layers": final["top_k"], "k": self.k, "ranking": rank(final["importance"]),
            "scores": final["importance"], "raw_scores": final["raw"], "trajectory": self.trajectory,
            "stop_step": self.stop_step, "components": self.parts.names, "tokens": self._token_report(),
            "linear_attention": {"name": self.variant.name, **self.variant.params},
            "probe_status": {int(l): rec for l, rec in sorted(self.probe_status.items())}, "failed_layers": sorted(self._failed()),
            "seconds": round(self._seconds_before + time.perf_counter() - self._t0, 3), "window_seconds": list(self.window_seconds),
            "stage1_seconds": round(self.distiller.phases.get("stage1", {}).get("seconds", 0.0), 3),
            "token_split": {"heldout_teacher": self.distiller.evaluator.teacher_tokens, "stage1_teacher": self._stage1_teacher_tokens},
        }

    def _token_report(self) -> dict[str, Any]:
        """Tokens spent (:func:`hybridize.selection.budgets.token_report`)."""
        return token_report(self.tokens, n_probes=self.n_probes, heldout_teacher=self.distiller.evaluator.teacher_tokens,
                            stage1_teacher=self._stage1_teacher_tokens)
