"""The steps ``run``, ``distill`` and ``compare`` are composed from, each written once.

- observers: optimizer steps and selection windows to ``OUT/metrics.jsonl`` and the observer hooks;
- :func:`select`: one selection engine run (probe-step lines, then ``hybridize_selection_done``);
- :func:`shared_stage1`: the layer-local stage 1 of one variant, all layers at once (seeds probes and finals);
- :func:`final_hybrid`: surgery at the chosen layers, stage 1 (or the shared one) -> stage 2 -> optional
  stage 3, then the save;
- :func:`evaluate_hybrid`: the config's evaluators on the final hybrid;
- token accounting: what ``result.json`` and ``compare.json`` report (:func:`run_tokens`, :func:`row_tokens`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch


# -- observers ------------------------------------------------------------------------------------
def observe_steps(pm: Any, log: Any, **context: Any) -> Any:
    """Each optimizer step: a line of ``OUT/metrics.jsonl`` (with ``context``) and the ``hybridize_step_end`` hook."""

    def on_step(stage: str, step: int, tokens: int, metrics: dict[str, float]) -> None:
        log.write({"stage": stage, "step": step, "tokens": tokens, **context, **metrics})
        pm.hook.hybridize_step_end(stage=stage, step=step, tokens=tokens, metrics=metrics)

    return on_step


def observe_windows(pm: Any, log: Any, **context: Any) -> Any:
    """Each selection window: a ``selection`` line (scores, top-K) and ``hybridize_step_end`` per probe."""

    def on_window(window: dict[str, Any]) -> None:
        step, tokens = window["step"], window["tokens_per_probe"]
        log.write({"stage": "selection", "step": step, "tokens": tokens, **context, "top_k": window["top_k"],
                   "jaccard_prev": window["jaccard_prev"], "raw": window["raw"], "importance": window["importance"]})
        for layer, raw in window["raw"].items():
            pm.hook.hybridize_step_end(stage=f"probe:{layer}", step=step, tokens=tokens,
                                       metrics={"score": raw, "importance": window["importance"].get(layer, float("nan"))})

    return on_window


# -- selection ------------------------------------------------------------------------------------
def select(*, teacher: Any, data: Any, cfg: Any, variant: Any, pm: Any, device: torch.device, k: int, ckpt_dir: Path,
           progress: bool, log: Any = None, context: dict[str, Any] | None = None, dist: Any = None,
           stage1_from: Any = None, run_to_budget: bool = False) -> tuple[Any, dict[str, Any]]:
    """One selection (``cfg`` is the run config; ``variant`` the probes'): a selection engine run, its windows and
    steps reported when ``log`` is given (the main process), then ``hybridize_selection_done``. Returns (engine, selection).
    ``run_to_budget``: probes train to the whole ``selection.probe_tokens`` whatever the stop criterion says."""
    from hybridize.selection.engine import SelectionEngine

    context = context or {}
    engine = SelectionEngine(teacher=teacher, data=data, cfg=resolved_selection(cfg, pm, device, dist), distill=cfg.distill, variant=variant, pm=pm,
                             device=device, k=k, ckpt_dir=ckpt_dir, seed=cfg.seed, progress=progress, dist=dist,
                             on_window=observe_windows(pm, log, **context) if log is not None else None,
                             on_step=observe_steps(pm, log, **context) if log is not None else None,
                             stage1_from=stage1_from, run_to_budget=run_to_budget)
    selection = engine.run()
    if log is not None:
        pm.hook.hybridize_selection_done(softmax_layers=selection["softmax_layers"], scores=selection["scores"])
    return engine, selection


def resolved_selection(cfg: Any, pm: Any, device: torch.device, dist: Any = None) -> Any:
    """``cfg.selection`` with ``probe_group_size`` / ``probe_offload: auto`` replaced by the memory plan's choice."""
    if isinstance(cfg.selection.probe_group_size, int) and cfg.selection.probe_offload != "auto":
        return cfg.selection
    from hybridize.recipes.plan import plan_run

    nproc = dist.world if dist is not None and getattr(dist, "active", False) else 1
    plan = plan_run(cfg, pm, nproc=nproc, device=device, check=False)
    return attrs.evolve(cfg.selection, probe_group_size=plan.group_size, probe_offload=plan.offload)


# -- stage 1 and the final hybrid -----------------------------------------------------------------
def shared_stage1(teacher: Any, data: Any, cfg: Any, variant: Any, *, pm: Any, device: torch.device, ckpt_dir: Path,
                  progress: bool) -> tuple[dict[int, Any], dict[str, int]]:
    """The shared stage 1 of one variant (as a selection engine runs it): all-linear student, all layers at once.

    Returns (frozen linear modules by layer, {"stage1": tokens, "teacher_forward": tokens})."""
    from hybridize.distill.stages import Distiller, linear_modules
    from hybridize.model.surgery import build_student

    torch.manual_seed(cfg.seed)
    student = build_student(teacher, [], variant.name, variant.params, pm=pm).to(device)
    distiller = Distiller(teacher=teacher, data=data, cfg=cfg.distill, device=device, ckpt_dir=ckpt_dir, seed=cfg.seed, progress=progress)
    distiller.stage1(student)
    modules = {i: m.requires_grad_(False) for i, m in linear_modules(student).items()}
    return modules, {"stage1": distiller.tokens["stage1"], "teacher_forward": distiller.tokens["teacher_forward"]}


def final_hybrid(teacher: Any, data: Any, cfg: Any, layers: list[int], stage1: dict[int, Any] | None, *, pm: Any,
                 device: torch.device, ckpt_dir: Path, progress: bool, tokenizer: Any = None, save_to: Path | None = None,
                 save_extra: dict[str, Any] | None = None, on_step: Any = None, dist: Any = None,
                 reseed: bool = False) -> tuple[Any, dict[str, Any], Any]:
    """Surgery at ``layers`` (variant ``cfg.linear_attention``), the linear layers from ``stage1`` when given (then
    the final distillation skips its own stage 1), stage 2 (and 3); saved to ``save_to`` when given.

    Returns (student, the distiller's report, the distiller)."""
    from hybridize.distill.stages import Distiller, linear_modules
    from hybridize.model.hybrid import save_hybrid
    from hybridize.model.surgery import build_student

    if reseed:
        torch.manual_seed(cfg.seed)
    student = build_student(teacher, layers, cfg.linear_attention.name, cfg.linear_attention.params, pm=pm)
    final_cfg = cfg.distill
    if stage1:  # stage 1 is layer-local: reuse the shared pass (of the same variant)
        for i, module in linear_modules(student).items():
            module.load_state_dict(stage1[i].state_dict())
        final_cfg = attrs.evolve(cfg.distill, stage1_tokens=0)
    distiller = Distiller(teacher=teacher, data=data, cfg=final_cfg, device=device, ckpt_dir=ckpt_dir, seed=cfg.seed,
                          progress=progress, on_step=on_step, dist=dist)
    report = distiller.run(student)
    if save_to is not None:
        save_hybrid(student.cpu(), save_to, tokenizer, extra=save_extra)
    return student, report, distiller


def evaluate_hybrid(evaluators: list[Any], pm: Any, student: Any, teacher: Any, heldout: Any, device: torch.device, *,
                    label: str, progress: bool) -> list[dict[str, Any]]:
    """Run ``evaluators`` on the final hybrid (moved to ``device`` for them, back to the CPU after); their records."""
    if not evaluators:
        return []
    from hybridize.evaluate import EvalTarget, run_evaluators

    target = EvalTarget(model=student.to(device), tokenizer=teacher.tokenizer, label=label, teacher=teacher.model,
                        heldout=heldout, progress=progress)
    out = run_evaluators(evaluators, target, pm)
    student.cpu()
    return out["evals"]


# -- token accounting -----------------------------------------------------------------------------
#: the selection tokens of an explicit ``softmax_layers`` list (nothing selected)
NO_SELECTION_TOKENS = {"stage1": 0, "probe_each": 0, "probes_total": 0, "teacher_forward": 0, "n_probes": 0,
                       "selection_cost": 0, "independent_pipeline_equivalent": 0, "cost_ratio": 1.0}


def stage1_cost(tokens: dict[str, int]) -> int:
    """What a stage-1 pass costs in the selection-cost unit: its stage-1 plus teacher-forward tokens."""
    return tokens["stage1"] + tokens["teacher_forward"]


def run_tokens(sel_tok: dict[str, Any], final_tok: dict[str, Any], shared: bool) -> dict[str, Any]:
    """``result.json`` ``tokens`` of a run: the selection's and the final distillation's, named for the report."""
    return {
        "stage1": sel_tok["stage1"] + final_tok["stage1"], "stage1_shared_with_final": shared,
        "stage1_selection": sel_tok["stage1"], "stage1_final": final_tok["stage1"],
        "stage2": final_tok["stage2"], "stage3": final_tok["stage3"],
        "probes": sel_tok["probes_total"], "probe_each": sel_tok["probe_each"], "n_probes": sel_tok["n_probes"],
        "teacher_forward_tokens": sel_tok["teacher_forward"] + final_tok["teacher_forward"],
        "selection_teacher_forward_tokens": sel_tok["teacher_forward"],
        "selection_cost": sel_tok["selection_cost"],
        "independent_pipeline_equivalent": sel_tok["independent_pipeline_equivalent"],
        "selection_cost_ratio": sel_tok["cost_ratio"],
        "selection_compute": sel_tok.get("compute", 0), "selection_compute_beyond_stage1": sel_tok.get("compute_beyond_stage1", 0),
    }


def row_tokens(sel_tok: dict[str, Any]) -> dict[str, Any]:
    """``compare.json`` row ``tokens``: what one selection spent, named for the table."""
    t = sel_tok
    return {"selection_cost": t["selection_cost"], "probes": t["probes_total"], "n_probes": t["n_probes"],
            "cost_ratio_vs_independent": t["cost_ratio"], "stage1": t["stage1"], "teacher_forward": t["teacher_forward"],
            "teacher_backward": t["teacher_backward"], "eval_forward": t["eval_forward"],
            "compute": t["compute"], "compute_beyond_stage1": t["compute_beyond_stage1"]}


def run_phases(selection_seconds: float, engine: Any, distiller: Any) -> dict[str, dict[str, float]]:
    """``result.json`` ``phases``: wall seconds and tokens of each phase as this process ran it.

    ``stage1``: the selection's shared stage 1 (or the final hybrid's own when there is no selection);
    ``probes``: the rest of the selection's wall time (probe training, teacher passes, scoring, window
    checkpoints) with every probe's tokens; ``stage2`` / ``stage3`` of the final hybrid (``final_stage1``
    when it ran a stage 1 of its own after a selection's). A phase finished before a ``--resume`` is absent,
    and the stage timings count only the tokens trained since the resume.
    """
    phases: dict[str, dict[str, float]] = {}
    if engine is not None:
        s1 = engine.distiller.phases.get("stage1")
        if s1:
            phases["stage1"] = dict(s1)
        phases["probes"] = {"seconds": max(0.0, selection_seconds - (s1 or {}).get("seconds", 0.0)),
                            "tokens": engine.tokens["probes_total"]}
    for name, rec in distiller.phases.items():
        phases["final_stage1" if name == "stage1" and "stage1" in phases else name] = dict(rec)
    return {k: {"seconds": round(v["seconds"], 3), "tokens": int(v["tokens"])} for k, v in phases.items()}


def final_tokens(report: dict[str, Any]) -> int:
    """Stage-2 plus stage-3 tokens of a final distillation."""
    return report["tokens"]["stage2"] + report["tokens"]["stage3"]
