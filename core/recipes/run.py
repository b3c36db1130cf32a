"""End-to-end drivers behind the CLI: ``run`` (select, then distil) and ``distill`` (explicit softmax layers).

Both run in one process or, under torchrun (``--nproc N``), on every rank: the selection's probes
fan out over the ranks and the distillation runs data parallel (see :mod:`hybridize.training.parallel`);
rank 0 alone writes the run directory.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hybridize.training import parallel as distributed
from hybridize.distill.stages import Distiller
from hybridize import faults
from hybridize.recipes.outputs import MetricsLog, check_resume_config, finish_run_dir, plot_distill_curve, prepare_out_dir, write_json
from hybridize.recipes.rundir import run_inputs
from hybridize.recipes.runconfig import RunConfig
from hybridize.selection.fanout import probes_per_rank
from hybridize.training.devices import resolve_device  # noqa: F401 - its home is training.devices


def _observe(pm: Any, log: MetricsLog) -> Any:
    """Each optimizer step: a line of ``OUT/metrics.jsonl`` and the ``hybridize_step_end`` hook."""

    def on_step(stage: str, step: int, tokens: int, metrics: dict[str, float]) -> None:
        log.write({"stage": stage, "step": step, "tokens": tokens, **metrics})
        pm.hook.hybridize_step_end(stage=stage, step=step, tokens=tokens, metrics=metrics)

    return on_step


def _observe_windows(pm: Any, log: MetricsLog) -> Any:
    """Each selection window: a ``selection`` line (scores, top-K) and ``hybridize_step_end`` per probe."""

    def on_window(window: dict[str, Any]) -> None:
        step, tokens = window["step"], window["tokens_per_probe"]
        log.write({"stage": "selection", "step": step, "tokens": tokens, "top_k": window["top_k"],
                   "jaccard_prev": window["jaccard_prev"], "raw": window["raw"], "importance": window["importance"]})
        for layer, raw in window["raw"].items():
            pm.hook.hybridize_step_end(stage=f"probe:{layer}", step=step, tokens=tokens,
                                       metrics={"score": raw, "importance": window["importance"].get(layer, float("nan"))})

    return on_window


def _evaluate(cfg: RunConfig, pm: Any, result: dict[str, Any], student: Any, teacher: Any, data: Any, device: torch.device, progress: bool) -> None:
    """Run the config's evaluators on the final hybrid: their metrics join ``result["metrics"]`` (see
    :func:`hybridize.evaluate.merge_metrics`), details go to ``result["evals"]``."""
    if not cfg.evaluators:
        return
    from hybridize.evaluate import EvalTarget, merge_metrics, run_evaluators

    target = EvalTarget(model=student.to(device), tokenizer=teacher.tokenizer, label="hybrid", teacher=teacher.model,
                        heldout=data.heldout, progress=progress)
    out = run_evaluators(cfg.evaluators, target, pm)
    student.cpu()
    result["metrics"] = merge_metrics(result["metrics"], out["evals"])
    result["evals"] = out["evals"]


def _open_run(cfg: RunConfig, out: str | Path, par: distributed.Dist, pm: Any, *, resume: bool, overwrite: bool,
              command: str) -> Path:
    """Rank 0 prepares OUT (refuses, overwrites or resumes it; records the config) and fires run_start."""

    def prepare() -> Path:
        path = prepare_out_dir(out, resume=resume, overwrite=overwrite, command=command, inputs=run_inputs(cfg))
        check_resume_config(path, cfg.to_dict(), teacher=cfg.teacher)
        pm.hook.hybridize_run_start(run_dir=str(path), config=cfg.to_dict())
        return path

    return par.on_main(prepare)


def _inputs(cfg: RunConfig, par: distributed.Dist, pm: Any, command: str, out: str | Path, *, resume: bool,
            overwrite: bool) -> tuple[Any, Any]:
    """The preflight (every input checked, nothing written), then the teacher on this rank's device; rank 0 first
    (download and data caches). Returns (teacher, preflight result)."""
    from hybridize.recipes.outputs import check_out_dir
    from hybridize.recipes.preflight import check_run
    from hybridize.model.teacher import load_teacher

    def load() -> tuple[Any, Any]:
        if par.is_main:  # read-only: refuse a full OUT before the slow checks
            check_out_dir(out, resume=resume, overwrite=overwrite, inputs=run_inputs(cfg))
        checked = check_run(cfg, pm, command=command)
        torch.manual_seed(cfg.seed)
        return load_teacher(cfg.teacher, device=par.device), checked

    return par.main_first(load)


def _on_every_rank(body: Any, cfg: RunConfig, out: str | Path, *, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any] | None:
    """Join the process group when torchrun started several processes, run ``body`` on this rank, leave the group."""
    par = distributed.setup(cfg.device)
    try:
        return body(cfg, out, par, resume=resume, overwrite=overwrite, progress=progress and par.is_main)
    finally:
        distributed.teardown(par)


def _dist_record(par: distributed.Dist, n_probes: int, distiller: Distiller) -> dict[str, Any]:
    """result.json ``distributed``: how the ranks shared the work."""
    record = {"world_size": par.world, "backend": par.backend, "final_distillation": distiller.parallel_used}
    if n_probes:
        record["probes_per_rank"] = probes_per_rank(n_probes, par.world)
    return record


def distill(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Surgery at ``cfg.softmax_layers`` (a list), stage 1 -> 2 -> 3, save the hybrid and result.json.

    Under torchrun every rank calls it; the stages run data parallel.

    Returns:
        The content of ``OUT/result.json`` (None on ranks other than 0).
    """
    return _on_every_rank(_distill, cfg, out, resume=resume, overwrite=overwrite, progress=progress)


def _distill(cfg: RunConfig, out: str | Path, par: distributed.Dist, *, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any] | None:
    from hybridize.model.hybrid import save_hybrid
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.model.surgery import build_student

    pm = get_plugin_manager()
    t0 = time.perf_counter()
    teacher, checked = _inputs(cfg, par, pm, "distill", out, resume=resume, overwrite=overwrite)
    out = _open_run(cfg, out, par, pm, resume=resume, overwrite=overwrite, command="distill")
    device, data = par.device, checked.data
    student = build_student(teacher.model, cfg.softmax_layers, cfg.linear_attention.name, cfg.linear_attention.params, pm=pm)
    log = MetricsLog(out, resume=resume)
    distiller = Distiller(teacher=teacher.model, data=data, cfg=cfg.distill, device=device, ckpt_dir=out / "checkpoints",
                          seed=cfg.seed, progress=progress, on_step=_observe(pm, log) if par.is_main else None, dist=par)
    try:
        report = distiller.run(student)
    finally:
        log.close()
    if not par.is_main:
        return None
    save_hybrid(student.cpu(), out / "model", teacher.tokenizer)
    faults.kill_point("save-result")
    result = {
        "softmax_layers": sorted(cfg.softmax_layers),
        "linear_attention": cfg.linear_attention.name,
        "tokens": report["tokens"],
        "metrics": report["metrics"],
        "history": report["history"],
        "data": {"documents": data.n_documents, "tokens": data.n_tokens, "train_blocks": data.train.shape[0],
                 "heldout_blocks": data.heldout.shape[0], "seq_len": data.seq_len},
        "config": cfg.to_dict(),
        "plugins": pm.versions(),
        "device": str(device),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        **({"distributed": _dist_record(par, 0, distiller)} if par.active else {}),
    }
    _evaluate(cfg, pm, result, student, teacher, data, device, progress)
    write_json(out / "result.json", result)
    plot_distill_curve(report["history"], report["metrics"].get("heldout_kl_after_surgery"), out / "distill.png",
                       f"{Path(cfg.teacher).name}: {cfg.linear_attention.name}, softmax layers {sorted(cfg.softmax_layers)}")
    finish_run_dir(out)
    pm.hook.hybridize_run_end(run_dir=str(out), result=result)
    return result


#: what the raw score of each teacher-only / stage-1 proxy scorer measures (axis labels)
_PROXY_LABELS = {
    "swap-kl": "held-out KL with layer l's attention swapped for its stage-1 fit [nats/token]",
    "grad-sensitivity": "|<attention output, dCE/d output>| per token",
    "attention-entropy": "attention entropy / log(#keys), mean over heads and positions",
}


def _raw_label(selection: dict[str, Any]) -> str:
    scorer, selector = selection["components"].get("scorer"), selection["components"]["selector"]
    if scorer == "kl":
        return "probe held-out KL(teacher || probe) [nats/token]"
    if scorer == "mse":
        return "stage-1 residual ||t - s||_2 / sqrt(d)"
    if scorer in _PROXY_LABELS:
        return _PROXY_LABELS[scorer]
    return f"importance ({selector})"


def _explicit_selection(layers: list[int], n_layers: int) -> dict[str, Any]:
    scores = {i: float(i in layers) for i in range(n_layers)}
    return {"softmax_layers": sorted(layers), "k": len(layers), "ranking": sorted(layers) + [i for i in range(n_layers) if i not in layers],
            "scores": scores, "raw_scores": {}, "trajectory": [], "stop_step": None, "components": {"selector": "explicit"},
            "tokens": {"stage1": 0, "probe_each": 0, "probes_total": 0, "teacher_forward": 0, "n_probes": 0,
                       "selection_cost": 0, "independent_pipeline_equivalent": 0, "cost_ratio": 1.0}}


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Select the softmax layers, distil the chosen hybrid, save it, write result.json and the plots.

    Under torchrun every rank calls it: the probes fan out over the ranks, the final distillation
    runs data parallel, rank 0 writes the outputs.

    Returns:
        The content of ``OUT/result.json`` (None on ranks other than 0).
    """
    return _on_every_rank(_run, cfg, out, resume=resume, overwrite=overwrite, progress=progress)


def _run(cfg: RunConfig, out: str | Path, par: distributed.Dist, *, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any] | None:
    import attrs

    from hybridize.model.hybrid import save_hybrid
    from hybridize.recipes.outputs import plot_jaccard, plot_scores
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.selection.engine import SelectionEngine
    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import decoder_layers

    pm = get_plugin_manager()
    t0 = time.perf_counter()
    teacher, checked = _inputs(cfg, par, pm, "run", out, resume=resume, overwrite=overwrite)
    out = _open_run(cfg, out, par, pm, resume=resume, overwrite=overwrite, command="run")
    device, data = par.device, checked.data
    n_layers = len(decoder_layers(teacher.model))
    k = checked.k(cfg.softmax_layers)
    engine = None
    log = MetricsLog(out, resume=resume)
    probe_variant = cfg.selection.linear_attention or cfg.linear_attention
    if isinstance(cfg.softmax_layers, list):
        selection = _explicit_selection(cfg.softmax_layers, n_layers)
    else:
        engine = SelectionEngine(teacher=teacher.model, data=data, cfg=cfg.selection, distill=cfg.distill, variant=probe_variant,
                                 pm=pm, device=device, k=k, ckpt_dir=out / "checkpoints" / "selection", seed=cfg.seed, progress=progress,
                                 dist=par, on_window=_observe_windows(pm, log) if par.is_main else None,
                                 on_step=_observe(pm, log) if par.is_main else None)
        try:
            selection = engine.run()
        finally:
            log.close()
    if par.is_main:
        pm.hook.hybridize_selection_done(softmax_layers=selection["softmax_layers"], scores=selection["scores"])
    faults.kill_point("selection-done")
    student = build_student(teacher.model, selection["softmax_layers"], cfg.linear_attention.name, cfg.linear_attention.params, pm=pm)
    final_cfg = cfg.distill
    shared = engine is not None and bool(engine.stage1_modules) and probe_variant == cfg.linear_attention
    if shared:  # stage 1 is layer-local: reuse the shared pass (of the same variant)
        from hybridize.distill.stages import linear_modules

        for i, module in linear_modules(student).items():
            module.load_state_dict(engine.stage1_modules[i].state_dict())
        final_cfg = attrs.evolve(cfg.distill, stage1_tokens=0)
    distiller = Distiller(teacher=teacher.model, data=data, cfg=final_cfg, device=device, ckpt_dir=out / "checkpoints" / "final",
                          seed=cfg.seed, progress=progress, on_step=_observe(pm, log) if par.is_main else None, dist=par)
    try:
        report = distiller.run(student)
    finally:
        log.close()
    if not par.is_main:
        return None
    save_hybrid(student.cpu(), out / "model", teacher.tokenizer, extra={"selection": selection["components"], "scores": selection["scores"]})
    faults.kill_point("save-result")
    sel_tok = selection["tokens"]
    tokens = {
        "stage1": sel_tok["stage1"] + report["tokens"]["stage1"], "stage1_shared_with_final": shared,
        "stage1_selection": sel_tok["stage1"], "stage1_final": report["tokens"]["stage1"],
        "stage2": report["tokens"]["stage2"], "stage3": report["tokens"]["stage3"],
        "probes": sel_tok["probes_total"], "probe_each": sel_tok["probe_each"], "n_probes": sel_tok["n_probes"],
        "teacher_forward_tokens": sel_tok["teacher_forward"] + report["tokens"]["teacher_forward"],
        "selection_teacher_forward_tokens": sel_tok["teacher_forward"],
        "selection_cost": sel_tok["selection_cost"],
        "independent_pipeline_equivalent": sel_tok["independent_pipeline_equivalent"],
        "selection_cost_ratio": sel_tok["cost_ratio"],
        "selection_compute": sel_tok.get("compute", 0), "selection_compute_beyond_stage1": sel_tok.get("compute_beyond_stage1", 0),
    }
    result = {
        "softmax_layers": selection["softmax_layers"], "linear_attention": cfg.linear_attention.name, "k": k,
        "probe_linear_attention": probe_variant.name if engine is not None else None,
        "scores": selection["scores"], "raw_scores": selection["raw_scores"], "ranking": selection["ranking"],
        "stop_step": selection["stop_step"], "selection": {"components": selection["components"], "trajectory": selection["trajectory"],
                                                         "linear_attention": selection.get("linear_attention"),
                                                         "final_linear_attention": {"name": cfg.linear_attention.name, **cfg.linear_attention.params},
                                                         "probe_status": selection.get("probe_status", {}), "failed_layers": selection.get("failed_layers", [])},
        "tokens": tokens, "metrics": report["metrics"], "history": report["history"], "config": cfg.to_dict(),
        "plugins": pm.versions(), "device": str(device), "wall_seconds": round(time.perf_counter() - t0, 1),
        **({"distributed": _dist_record(par, sel_tok["n_probes"], distiller)} if par.active else {}),
    }
    _evaluate(cfg, pm, result, student, teacher, data, device, progress)
    write_json(out / "result.json", result)
    name = f"{Path(cfg.teacher).name}: {selection['components']['selector']}, K={k}"
    if engine is not None and probe_variant != cfg.linear_attention:
        name += f", {probe_variant.name} probes -> {cfg.linear_attention.name} hybrid"
    plot_scores(selection, out / "scores.png", name, _raw_label(selection))
    stop = cfg.selection.stop.params
    plot_jaccard(selection, out / "jaccard.png", name, windows=int(stop.get("windows", 10)), threshold=stop.get("threshold", 0.9 if cfg.selection.stop.name == "rolling-jaccard" else None))
    plot_distill_curve(report["history"], report["metrics"].get("heldout_kl_after_surgery"), out / "distill.png", f"{name}: final hybrid {selection['softmax_layers']}")
    finish_run_dir(out)
    pm.hook.hybridize_run_end(run_dir=str(out), result=result)
    return result
