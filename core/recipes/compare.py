"""Selectors head to head: same teacher, data, seeds, budgets; everything shareable is shared.

``hybridize compare CONFIG`` takes a run config with a ``compare`` section::

    compare:
      selectors: [kl-greedy-add, kl-greedy-remove, mse-greedy-add, uniform, random]
      softmax_layers: [0.25, 0.5]     # K or ratios; one row of the table per selector and budget
      seeds: [0, 1, 2]
      probe_variants: [gdn, gla]      # optional: the probes' variant (selection.linear_attention) ...
      final_variants: [gla]           # ... crossed with the final hybrid's (linear_attention)
      reference: kl-greedy-add        # rank correlation / overlap / cost of every other selector against it

What is shared, per seed (the seed fixes the data split and order, stage-1 initialisation and
seeded selectors): the teacher (loaded once), the packed data, ONE stage-1 pass per variant
(layer-local, so it seeds every probe of every selector and every final hybrid of that variant),
one selection per (selector, budget, probe variant) whatever the final variants, and the final
distillation of each distinct (final variant, softmax-layer set) (two selectors that pick the same
layers share one final hybrid and its evaluation). Each row still reports what its selector would
spend alone, so costs compare fairly.

Beyond the table: ``rank_correlation`` (Spearman of each selector's per-layer scores with the
reference's, Jaccard of their top-K sets, token cost as a fraction of the reference's) and, with
several probe variants, ``overlap`` (Jaccard of the top-K sets of two probe variants and of their
trajectories, window by window): see :mod:`hybridize.recipes.compare_report`.

Outputs: ``OUT/compare.json`` (every row, the aggregated table, token totals), ``OUT/compare.md``
(selector x budget -> selected layers, selection tokens, held-out KL, perplexity, every evaluator
metric as mean +- std over seeds), ``OUT/compare_metrics.png`` (each metric against the softmax
budget, one line per selector) and ``OUT/compare_layers.png`` (selector x layer heat map: how
often each layer was selected); ``OUT/metrics.jsonl`` (every step and selection window as it happens,
tagged with its seed and selector or final variant, as ``run`` writes it). The observer hooks fire as in
``run``: run start / end once, step end per step and probe, selection done per selection. A killed compare resumes with ``--resume``: finished rows are kept
in ``OUT/checkpoints/rows.json``, finished final hybrids and the token ledgers in ``OUT/checkpoints/state.json``, a
probe run trained to the whole budget in its ``probe_run.json``, and a selection in progress resumes from its probe
checkpoint.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from hybridize.recipes.compare_report import (aggregate, label, markdown_table, overlaps, plot_layers, plot_metrics,  # noqa: F401
                                              rank_correlations, report_markdown, stop_checks, stop_markdown)
from hybridize.recipes.compare_config import (DEFAULT_SELECTORS, CompareConfig, compare_config_from_dict,  # noqa: F401
                                              load_compare_config)
from hybridize.registry.configs import ComponentRef
from hybridize.recipes.outputs import write_json
from hybridize.recipes.runconfig import RunConfig
from hybridize.recipes.steps import (evaluate_hybrid, final_hybrid, final_tokens, observe_steps, row_tokens, select,
                                     shared_stage1, stage1_cost)

def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


@attrs.frozen
class _ProbeRun:
    """What a replayed probe run needs of its engine (:func:`hybridize.selection.budgets.budget_view`)."""

    cfg: Any
    n_layers: int
    ran_stage1: bool = False  # the run trained its variant's stage 1 (its modules are not kept: a final trains it again)
    stage1_shared: bool = False
    stage1_modules: Any = None


@attrs.define(slots=False)
class _Comparison:
    """The state of one ``hybridize compare``: shared teacher, finished rows, token ledgers."""

    base: RunConfig
    ccfg: CompareConfig
    out: Path
    teacher: Any
    pm: Any
    device: torch.device
    ks: dict[Any, int]
    rows: list[dict[str, Any]]
    progress: bool
    log: Any = None  # OUT/metrics.jsonl (hybridize.recipes.outputs.MetricsLog)
    checked_data: dict[int, Any] = attrs.Factory(dict)  # seed -> the data the preflight already packed
    n_layers: int = 0
    # tokens actually spent vs the sum of what each row would spend alone (selection cost = teacher-forward
    # + stage-1 tokens, as in result.json; final = stage-2 (+ stage-3) tokens of its final hybrid, plus the
    # stage 1 of its variant where its selection did not already run it)
    spent: dict[str, int] = attrs.Factory(lambda: {"selection": 0, "final_stage1": 0, "final_distill": 0, "final_hybrids": 0})
    standalone: dict[str, int] = attrs.Factory(lambda: {"selection": 0, "final_stage1": 0, "final_distill": 0})

    def __attrs_post_init__(self) -> None:
        self.saved_finals: dict[str, Any] = {}  # "seed|variant|layers" -> a finished final hybrid (OUT/checkpoints/state.json)
        self.saved_stage1: dict[str, Any] = {}  # "seed|variant" -> the tokens of that seed's stage 1 of the variant
        self._load_state()
        self.done = {self._key(r["seed"], r["selector"], r["k"], r.get("probe_variant"), r.get("final_variant")) for r in self.rows}
        self.probes = self.ccfg.probe_variants or [self.base.selection.linear_attention or self.base.linear_attention]
        self.finals = self.ccfg.final_variants or [self.base.linear_attention]

    @staticmethod
    def _key(*parts: Any) -> tuple[Any, ...]:
        return tuple(parts)

    # -- what a resumed compare keeps besides its rows ------------------------------------------------
    # OUT/checkpoints/state.json: the token ledgers as of len(rows) finished rows, and every finished final hybrid
    # (metrics, tokens, seconds), so a resume neither retrains a final another row already paid for nor forgets
    # what was spent before it. A probe run trained to the whole budget (compare.verify_stop) leaves its record in
    # its checkpoint folder (probe_run.json): a resume replays it instead of training the probes again.
    def _state_path(self) -> Path:
        return self.out / "checkpoints" / "state.json"

    def _load_state(self) -> None:
        path = self._state_path()
        if not self.rows or not path.is_file():
            return
        state = json.loads(path.read_text())
        self.saved_finals = dict(state.get("finals", {}))
        self.saved_stage1 = dict(state.get("stage1_tokens", {}))
        if state.get("rows") == len(self.rows):  # ledgers that match the finished rows (not after rows.json was cut)
            self.spent.update(state["spent"])
            self.standalone.update(state["standalone"])

    def _save_state(self) -> None:
        write_json(self.out / "checkpoints" / "rows.json", self.rows)
        write_json(self._state_path(), {"rows": len(self.rows), "spent": self.spent, "standalone": self.standalone,
                                        "finals": self.saved_finals, "stage1_tokens": self.saved_stage1})

    def _set_stage1(self, seed: int, variant: str, stage1: tuple[dict[int, Any], dict[str, int]]) -> None:
        """This seed's stage 1 of ``variant`` (modules, token counts); its counts outlive a resume."""
        self.stage1[variant] = stage1
        self.saved_stage1[f"{seed}|{variant}"] = stage1[1]

    def _stage1_tokens(self, seed: int, variant: str) -> dict[str, int]:
        """The token counts of this seed's stage 1 of ``variant`` (this process's, or a run's before a resume)."""
        return self.saved_stage1[f"{seed}|{variant}"]

    @staticmethod
    def _final_key(seed: int, fvl: str, layers: Any) -> str:
        return f"{seed}|{fvl}|{','.join(map(str, layers))}"

    def run_seed(self, seed: int) -> None:
        """Every selection of one seed (one per selector, budget and probe variant) and the final hybrids it needs."""
        from hybridize.training.data import prepare_data

        self.data, self.stage1, self.final_cache, self.shared = None, {}, {}, {}
        for pv in self.probes:
            for budget in self.ccfg.softmax_layers or [self.base.softmax_layers]:
                for sel in self.ccfg.selectors:
                    k = self.ks[budget]
                    todo = [fv for fv in self.finals if self._key(seed, label(sel), k, label(pv), label(fv)) not in self.done]
                    if not todo:
                        continue
                    if self.data is None:
                        torch.manual_seed(seed)
                        self.data = self.checked_data.pop(seed, None) or prepare_data(self.base.data, self.teacher.tokenizer, seed=seed)
                    self._selection(seed, sel, budget, pv, todo)

    def _selection(self, seed: int, sel: ComponentRef, budget: Any, pv: ComponentRef, finals: list[ComponentRef]) -> None:
        k, pvl = self.ks[budget], label(pv)
        cfg = attrs.evolve(self.base, seed=seed, softmax_layers=budget,
                           selection=attrs.evolve(self.base.selection, selector=sel, linear_attention=pv))
        engine, selection, ran = self._select(cfg, seed, sel, pv, k)
        self.standalone["selection"] += selection["tokens"]["selection_cost"]
        if ran is not None:  # this call trained (a probe run trained to the whole budget serves the other budgets)
            self.spent["selection"] += ran["tokens"]["selection_cost"]
            if engine.stage1_shared:  # this selection reused the seed's stage 1 of its variant: it did not spend it again
                self.spent["selection"] -= stage1_cost(self._stage1_tokens(seed, pvl))
            elif engine.stage1_modules:
                self._set_stage1(seed, pvl, (engine.stage1_modules, engine.stage1_tokens()))
            self._save_state()  # the ledgers with this run's tokens, before its rows
        for fv in finals:
            final = self._final(cfg, fv, selection["softmax_layers"])
            ran_stage1 = bool(engine.stage1_modules) or getattr(engine, "ran_stage1", False)
            if not (ran_stage1 and label(fv) == pvl):  # alone, this row's final would run its own stage 1
                self.standalone["final_stage1"] += stage1_cost(self._stage1_tokens(seed, label(fv)))
            self.standalone["final_distill"] += final["stage2_tokens"]
            self.rows.append(self._row(cfg, sel, pv, fv, selection, final))
            self._save_state()

    def _select(self, cfg: RunConfig, seed: int, sel: ComponentRef, pv: ComponentRef, k: int) -> tuple[Any, dict[str, Any], Any]:
        """(engine, this budget's selection, the record of the run when this call trained one, else None).

        With ``compare.verify_stop`` a probe selector trains once per seed and probe variant to the whole probe
        budget; every budget's selection is then read off that run (:func:`hybridize.selection.budgets.budget_view`)."""
        from hybridize.selection.budgets import budget_view
        from hybridize.selection.contract import build_selector_configs

        pvl, key = label(pv), (seed, label(sel), label(pv))
        entry = self.pm.registry("selector")[sel.name]
        shared = self.ccfg.verify_stop and entry.factory(build_selector_configs(entry, sel.params)[0], seed=seed).needs == "probes"
        view = lambda eng, rec: budget_view(rec, k, cfg=eng.cfg, pm=self.pm, seed=seed, n_layers=eng.n_layers)  # noqa: E731
        if shared and key in self.shared:
            return self.shared[key][0], view(*self.shared[key]), None
        ckpt_dir = self.out / "checkpoints" / f"seed{seed}" / ("shared" if shared else f"k{k}") / _slug(pvl) / _slug(label(sel))
        saved = ckpt_dir / "probe_run.json"
        if shared and saved.is_file():  # trained to the whole budget before a resume: replay its record
            kept = json.loads(saved.read_text())
            engine = _ProbeRun(cfg=cfg.selection, n_layers=self.n_layers, ran_stage1=kept["ran_stage1"])
            self.shared[key] = (engine, kept["record"])
            return engine, view(*self.shared[key]), None
        engine, record = select(teacher=self.teacher.model, data=self.data, cfg=cfg, variant=pv, pm=self.pm, device=self.device,
                                k=k, progress=self.progress, stage1_from=self.stage1.get(pvl), log=self.log, run_to_budget=shared,
                                context={"seed": seed, "selector": label(sel), "k": k, "probe_variant": pvl, "run_to_budget": shared},
                                ckpt_dir=ckpt_dir)
        if not shared:
            return engine, record, record
        saved.parent.mkdir(parents=True, exist_ok=True)  # probe_checkpoints: memory leaves the folder unmade
        write_json(saved, {"record": record, "ran_stage1": bool(engine.stage1_modules)})
        self.shared[key] = (engine, record)
        return engine, view(engine, record), record

    def _final(self, cfg: RunConfig, fv: ComponentRef, layers: list[int]) -> dict[str, Any]:
        """The final hybrid of variant ``fv`` at ``layers`` (shared by every selection that picks them), evaluated."""
        from hybridize.evaluate import merge_metrics

        fvl, key = label(fv), (label(fv), tuple(layers))
        if key in self.final_cache:
            return {**self.final_cache[key], "reused": True}
        if self._final_key(cfg.seed, fvl, layers) in self.saved_finals:  # finished before a resume
            self.final_cache[key] = self.saved_finals[self._final_key(cfg.seed, fvl, layers)]
            return {**self.final_cache[key], "reused": True}
        t0 = time.perf_counter()
        seed_dir = self.out / "checkpoints" / f"seed{cfg.seed}"
        cfg = attrs.evolve(cfg, linear_attention=fv)
        if fvl not in self.stage1:  # no selection so far ran this variant's stage 1: run the shared pass for the finals
            self._set_stage1(cfg.seed, fvl, shared_stage1(self.teacher.model, self.data, cfg, fv, pm=self.pm, device=self.device,
                                             ckpt_dir=seed_dir / f"stage1-{_slug(fvl)}", progress=self.progress))
            self.spent["final_stage1"] += stage1_cost(self._stage1_tokens(cfg.seed, fvl))
        name = f"{_slug(fvl)}-" + "-".join(map(str, layers))
        on_step = observe_steps(self.pm, self.log, seed=cfg.seed, final_variant=fvl, layers=list(layers)) if self.log else None
        student, report, _ = final_hybrid(
            self.teacher.model, self.data, cfg, layers, self.stage1[fvl][0], pm=self.pm, device=self.device,
            ckpt_dir=seed_dir / f"final-{name}", progress=self.progress, tokenizer=self.teacher.tokenizer, on_step=on_step,
            save_to=self.out / "models" / f"seed{cfg.seed}" / name if self.ccfg.save_models else None, reseed=True)
        t1 = time.perf_counter()
        evals = evaluate_hybrid(cfg.evaluators, self.pm, student, self.teacher, self.data.heldout, self.device,
                                label=f"{fvl} {layers}", progress=self.progress)
        own = {k_: v for k_, v in report["metrics"].items() if k_ in ("heldout_kl", "student_ppl", "teacher_ppl")}
        metrics = {k_: v for k_, v in merge_metrics(own, evals).items() if k_ != "teacher_ppl"}
        self.final_cache[key] = {"metrics": metrics, "stage2_tokens": final_tokens(report),
                                 "evals": evals, "teacher_ppl": report["metrics"].get("teacher_ppl"),
                                 "seconds": {"distill": round(t1 - t0, 3), "eval": round(time.perf_counter() - t1, 3)}}
        self.spent["final_distill"] += self.final_cache[key]["stage2_tokens"]
        self.spent["final_hybrids"] += 1
        self.saved_finals[self._final_key(cfg.seed, fvl, layers)] = {k_: v for k_, v in self.final_cache[key].items() if k_ != "evals"}
        return self.final_cache[key]

    @staticmethod
    def _row(cfg: RunConfig, sel: ComponentRef, pv: ComponentRef, fv: ComponentRef, selection: dict[str, Any],
             final: dict[str, Any]) -> dict[str, Any]:
        return {
            "seed": cfg.seed, "selector": label(sel), "selector_name": sel.name, "selector_params": dict(sel.params),
            "probe_variant": label(pv), "final_variant": label(fv), "budget": cfg.softmax_layers, "k": selection["k"],
            "softmax_layers": selection["softmax_layers"], "scores": selection["scores"], "raw_scores": selection["raw_scores"],
            "stop_step": selection["stop_step"],
            "trajectory_top_k": [[w["tokens_per_probe"], w["top_k"]] for w in selection["trajectory"]],
            "tokens": row_tokens(selection["tokens"]),
            "metrics": final["metrics"], "teacher_ppl": final["teacher_ppl"],
            "seconds": {"selection": selection.get("seconds"), "selection_stage1": selection.get("stage1_seconds"),
                        "final_distill": final["seconds"]["distill"], "final_eval": final["seconds"]["eval"],
                        "final_reused": bool(final.get("reused"))},
            **({"stop_check": selection["stop_check"]} if "stop_check" in selection else {}),
        }


def compare(base: RunConfig, ccfg: CompareConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True, pm: Any = None) -> dict[str, Any]:
    """Run every selector at every budget, probe variant and seed, each with every final variant; write
    compare.json, compare.md, the plots and ``OUT/metrics.jsonl``; fire the observer hooks as ``run`` does.

    Args:
        pm: the command's plugin manager (default: a new one).

    Returns:
        The content of ``OUT/compare.json``.
    """
    from hybridize.recipes.outputs import MetricsLog

    if pm is None:
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    t0 = time.perf_counter()
    run, n_layers, config = _open(base, ccfg, out, pm, resume=resume, overwrite=overwrite, progress=progress)
    pm.hook.hybridize_run_start(run_dir=str(run.out), config=config)
    run.log = MetricsLog(run.out, resume=resume)
    try:
        for seed in config["compare"]["seeds"]:
            run.run_seed(seed)
    finally:
        run.log.close()
    result = _write_outputs(run, n_layers, config["compare"]["softmax_layers"], config["compare"]["seeds"], config,
                            time.perf_counter() - t0)
    pm.hook.hybridize_run_end(run_dir=str(run.out), result=result)
    return result


def _open(base: RunConfig, ccfg: CompareConfig, out: str | Path, pm: Any, *, resume: bool, overwrite: bool,
          progress: bool) -> tuple[_Comparison, int, dict[str, Any]]:
    """The preflight, the teacher, OUT prepared (refused, overwritten or resumed): the comparison, n_layers, its config."""
    from hybridize.model.teacher import load_teacher
    from hybridize.recipes.outputs import check_out_dir, check_resume_config
    from hybridize.recipes.preflight import check_run
    from hybridize.training.devices import resolve_device
    from hybridize.recipes.rundir import prepare_out_dir, run_inputs

    budgets = ccfg.softmax_layers or [base.softmax_layers]
    check_out_dir(out, resume=resume, overwrite=overwrite, inputs=run_inputs(base))  # read-only: refuse a full OUT before the slow checks
    checked = check_run(base, pm, command="compare", budgets=budgets, selectors=ccfg.selectors, seed=(ccfg.seeds or [base.seed])[0])
    ks = {b: checked.k(b) for b in budgets}
    device = resolve_device(base.device)
    teacher = load_teacher(base.teacher, device=device)
    out = prepare_out_dir(out, resume=resume, overwrite=overwrite, command="compare", inputs=run_inputs(base))
    seeds = ccfg.seeds or [base.seed]
    refs = lambda refs_: None if refs_ is None else [{"name": r.name, **r.params} for r in refs_]  # noqa: E731
    config = {**base.to_dict(), "compare": {"selectors": refs(ccfg.selectors), "softmax_layers": budgets, "seeds": seeds,
                                            "save_models": ccfg.save_models, "probe_variants": refs(ccfg.probe_variants),
                                            "final_variants": refs(ccfg.final_variants), "reference": ccfg.reference}}
    rows_path = out / "checkpoints" / "rows.json"
    rows: list[dict[str, Any]] = json.loads(rows_path.read_text()) if resume and rows_path.exists() else []
    check_resume_config(out, config, teacher=base.teacher, finished_rows=len(rows))
    run = _Comparison(base=base, ccfg=ccfg, out=out, teacher=teacher, pm=pm, device=device, ks=ks, rows=rows, progress=progress,
                      checked_data={checked.seed: checked.data}, n_layers=checked.teacher.n_layers)
    return run, checked.teacher.n_layers, config


def _write_outputs(run: _Comparison, n_layers: int, budgets: list[Any], seeds: list[int], config: dict[str, Any],
                   seconds: float) -> dict[str, Any]:
    """compare.json, compare.md (table, correlation with the reference, probe-variant overlap, closing note), plots."""
    base, rows, out = run.base, run.rows, run.out
    table = aggregate(rows)
    correlation = rank_correlations(rows, run.ccfg.reference)
    overlap = overlaps(rows)
    checks = stop_checks(rows)
    result = {
        "teacher": base.teacher, "linear_attention": base.linear_attention.name, "n_layers": n_layers,
        "selectors": [label(s) for s in run.ccfg.selectors], "budgets": budgets, "seeds": seeds,
        "probe_variants": [label(v) for v in run.probes], "final_variants": [label(v) for v in run.finals],
        "table": table, "rows": rows, "rank_correlation": correlation, "overlap": overlap, "stop_check": checks,
        "tokens": {"spent": run.spent, "standalone_sum": run.standalone},
        "config": config,
        "plugins": run.pm.versions(), "device": str(run.device), "wall_seconds": round(seconds, 1),
    }
    (out / "compare.md").write_text(markdown_table(table) + "\n" + report_markdown(correlation, overlap)
                                    + stop_markdown(checks, base.selection.stop.name) + "\n")
    write_json(out / "compare.json", result)
    variants = sorted({label(v) for v in run.finals})
    title = f"{Path(base.teacher).name}: {', '.join(variants)} hybrids"
    plot_metrics(table, out / "compare_metrics.png", title)
    plot_layers(rows, n_layers, out / "compare_layers.png", f"softmax layers chosen per selector\n{title}")
    return result
