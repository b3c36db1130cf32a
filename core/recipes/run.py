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
from hybridize.recipes.steps import (NO_SELECTION_TOKENS, evaluate_hybrid, final_hybrid, observe_steps, observe_windows,
                                     run_phases, run_tokens, select)
from hybridize.selection.fanout import probes_per_rank
from hybridize.training.devices import resolve_device  # noqa: F401 - its home is training.devices


#: the observers of :mod:`hybridize.recipes.steps` under their former names
_observe, _observe_windows = observe_steps, observe_windows


def _evaluate(cfg: RunConfig, pm: Any, result: dict[str, Any], student: Any, teacher: Any, data: Any, device: torch.device, progress: bool) -> None:
    """Run the config's evaluators on the final hybrid: their metrics join ``result["metrics"]`` (see
    :func:`hybridize.evaluate.merge_metrics`), details go to ``result["evals"]``."""
    if not cfg.evaluators:
        return
    from hybridize.evaluate import merge_metrics

    evals = evaluate_hybrid(cfg.evaluators, pm, student, teacher, data.heldout, device, label="hybrid", progress=progress)
    result["metrics"] = merge_metrics(result["metrics"], evals)
    result["evals"] = evals


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
        if command == "run":  # the memory plan refuses what cannot fit, before OUT is written
            from hybridize.recipes.plan import plan_run

            plan_run(cfg, pm, nproc=par.world, device=par.device, out=out)
        torch.manual_seed(cfg.seed)
        return load_teacher(cfg.teacher, device=par.device), checked

    return par.main_first(load)


def _on_every_rank(body: Any, cfg: RunConfig, out: str | Path, pm: Any, *, resume: bool, overwrite: bool,
                   progress: bool) -> dict[str, Any] | None:
    """Join the process group when torchrun started several processes, run ``body`` on this rank (with the
    command's plugin manager: ``pm``, else a new one), leave the group."""
    if pm is None:
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    par = distributed.setup(cfg.device)
    try:
        return body(cfg, out, par, pm, resume=resume, overwrite=overwrite, progress=progress and par.is_main)
    finally:
        distributed.teardown(par)


def _dist_record(par: distributed.Dist, n_probes: int, distiller: Distiller) -> dict[str, Any]:
    """result.json ``distributed``: how the ranks shared the work."""
    record = {"world_size": par.world, "backend": par.backend, "final_distillation": distiller.parallel_used}
    if n_probes:
        record["probes_per_rank"] = probes_per_rank(n_probes, par.world)
    return record


def distill(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            pm: Any = None) -> dict[str, Any] | None:
    """Surgery at ``cfg.softmax_layers`` (a list), stage 1 -> 2 -> 3, save the hybrid and result.json.

    Under torchrun every rank calls it; the stages run data parallel.

    Returns:
        The content of ``OUT/result.json`` (None on ranks other than 0).
    """
    return _on_every_rank(_distill, cfg, out, pm, resume=resume, overwrite=overwrite, progress=progress)


def _distill(cfg: RunConfig, out: str | Path, par: distributed.Dist, pm: Any, *, resume: bool, overwrite: bool,
             progress: bool) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    teacher, checked = _inputs(cfg, par, pm, "distill", out, resume=resume, overwrite=overwrite)
    out = _open_run(cfg, out, par, pm, resume=resume, overwrite=overwrite, command="distill")
    device, data = par.device, checked.data
    log = MetricsLog(out, resume=resume)
    try:
        student, report, distiller = final_hybrid(
            teacher.model, data, cfg, cfg.softmax_layers, None, pm=pm, device=device, ckpt_dir=out / "checkpoints",
            progress=progress, tokenizer=teacher.tokenizer, save_to=out / "model" if par.is_main else None,
            on_step=_observe(pm, log) if par.is_main else None, dist=par)
    finally:
        log.close()
    if not par.is_main:
        return None
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
        "wall_seconds": round(time.perf_counter() - t0, 1), "phases": run_phases(0.0, None, distiller),
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
            "tokens": dict(NO_SELECTION_TOKENS)}


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        pm: Any = None) -> dict[str, Any] | None:
    """Select the softmax layers, distil the chosen hybrid, save it, write result.json and the plots.

    Under torchrun every rank calls it: the probes fan out over the ranks, the final distillation
    runs data parallel, rank 0 writes the outputs.

    Returns:
        The content of ``OUT/result.json`` (None on ranks other than 0).
    """
    return _on_every_rank(_run, cfg, out, pm, resume=resume, overwrite=overwrite, progress=progress)


def _run(cfg: RunConfig, out: str | Path, par: distributed.Dist, pm: Any, *, resume: bool, overwrite: bool,
         progress: bool) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    teacher, checked = _inputs(cfg, par, pm, "run", out, resume=resume, overwrite=overwrite)
    out = _open_run(cfg, out, par, pm, resume=resume, overwrite=overwrite, command="run")
    k = checked.k(cfg.softmax_layers)
    log = MetricsLog(out, resume=resume)
    probe_variant = cfg.selection.linear_attention or cfg.linear_attention
    t_sel = time.perf_counter()
    engine, selection = _select(cfg, teacher, checked.data, par, pm, log, out, k, probe_variant, progress)
    t_sel = time.perf_counter() - t_sel
    faults.kill_point("selection-done")
    shared = engine is not None and bool(engine.stage1_modules) and probe_variant == cfg.linear_attention
    try:
        student, report, distiller = final_hybrid(
            teacher.model, checked.data, cfg, selection["softmax_layers"], engine.stage1_modules if shared else None, pm=pm,
            device=par.device, ckpt_dir=out / "checkpoints" / "final", progress=progress, tokenizer=teacher.tokenizer,
            save_to=out / "model" if par.is_main else None,
            save_extra={"selection": selection["components"], "scores": selection["scores"]},
            on_step=_observe(pm, log) if par.is_main else None, dist=par)
    finally:
        log.close()
    if not par.is_main:
        return None
    faults.kill_point("save-result")
    result = _run_result(cfg, pm, par, selection, report, distiller, k=k, probe_variant=probe_variant if engine is not None else None,
                         shared=shared, seconds=time.perf_counter() - t0)
    result["phases"] = run_phases(t_sel, engine, distiller)
    _evaluate(cfg, pm, result, student, teacher, checked.data, par.device, progress)
    write_json(out / "result.json", result)
    _run_plots(cfg, selection, report, out, k, probe_variant if engine is not None else None)
    finish_run_dir(out)
    pm.hook.hybridize_run_end(run_dir=str(out), result=result)
    return result


def _select(cfg: RunConfig, teacher: Any, data: Any, par: distributed.Dist, pm: Any, log: MetricsLog, out: Path, k: int,
            probe_variant: Any, progress: bool) -> tuple[Any, dict[str, Any]]:
    """The selection of a run (none for an explicit list); (engine or None, selection)."""
    from hybridize.model.teacher import decoder_layers

    if isinstance(cfg.softmax_layers, list):
        selection = _explicit_selection(cfg.softmax_layers, len(decoder_layers(teacher.model)))
        if par.is_main:
            pm.hook.hybridize_selection_done(softmax_layers=selection["softmax_layers"], scores=selection["scores"])
        return None, selection
    try:
        return select(teacher=teacher.model, data=data, cfg=cfg, variant=probe_variant, pm=pm, device=par.device, k=k,
                      ckpt_dir=out / "checkpoints" / "selection", progress=progress, log=log if par.is_main else None, dist=par)
    finally:
        log.close()


def _run_result(cfg: RunConfig, pm: Any, par: distributed.Dist, selection: dict[str, Any], report: dict[str, Any],
                distiller: Distiller, *, k: int, probe_variant: Any, shared: bool, seconds: float) -> dict[str, Any]:
    """``result.json`` of a run, before the evaluators add theirs."""
    sel_tok = selection["tokens"]
    return {
        "softmax_layers": selection["softmax_layers"], "linear_attention": cfg.linear_attention.name, "k": k,
        "probe_linear_attention": probe_variant.name if probe_variant is not None else None,
        "scores": selection["scores"], "raw_scores": selection["raw_scores"], "ranking": selection["ranking"],
        "stop_step": selection["stop_step"], "selection": {"components": selection["components"], "trajectory": selection["trajectory"],
                                                         "linear_attention": selection.get("linear_attention"),
                                                         "final_linear_attention": {"name": cfg.linear_attention.name, **cfg.linear_attention.params},
                                                         "probe_status": selection.get("probe_status", {}), "failed_layers": selection.get("failed_layers", [])},
        "tokens": run_tokens(sel_tok, report["tokens"], shared), "metrics": report["metrics"], "history": report["history"],
        "config": cfg.to_dict(), "plugins": pm.versions(), "device": str(par.device), "wall_seconds": round(seconds, 1),
        **({"distributed": _dist_record(par, sel_tok["n_probes"], distiller)} if par.active else {}),
    }


def _run_plots(cfg: RunConfig, selection: dict[str, Any], report: dict[str, Any], out: Path, k: int, probe_variant: Any) -> None:
    """scores.png, jaccard.png and distill.png of a run (``probe_variant``: None without a selection engine)."""
    from hybridize.recipes.outputs import plot_jaccard, plot_scores

    name = f"{Path(cfg.teacher).name}: {selection['components']['selector']}, K={k}"
    if probe_variant is not None and probe_variant != cfg.linear_attention:
        name += f", {probe_variant.name} probes -> {cfg.linear_attention.name} hybrid"
    plot_scores(selection, out / "scores.png", name, _raw_label(selection))
    stop = cfg.selection.stop.params
    plot_jaccard(selection, out / "jaccard.png", name, windows=int(stop.get("windows", 10)), threshold=stop.get("threshold", 0.9 if cfg.selection.stop.name == "rolling-jaccard" else None))
    plot_distill_curve(report["history"], report["metrics"].get("heldout_kl_after_surgery"), out / "distill.png", f"{name}: final hybrid {selection['softmax_layers']}")
