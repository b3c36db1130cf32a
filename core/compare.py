"""Selectors head to head: same teacher, data, seeds, budgets; everything shareable is shared.

``hybridize compare CONFIG`` takes a run config with a ``compare`` section::

    compare:
      selectors: [kl-greedy-add, kl-greedy-remove, mse-greedy-add, uniform, random]
      softmax_layers: [0.25, 0.5]     # K or ratios; one row of the table per selector and budget
      seeds: [0, 1, 2]

What is shared, per seed (the seed fixes the data split and order, stage-1 initialisation and
seeded selectors): the teacher (loaded once), the packed data, ONE stage-1 pass (layer-local, so it
seeds every probe of every selector and every final hybrid), and the final distillation of each
distinct softmax-layer set (two selectors that pick the same layers share one final hybrid and its
evaluation). Each row still reports what its selector would spend alone, so costs compare fairly.

Outputs: ``OUT/compare.json`` (every row, the aggregated table, token totals), ``OUT/compare.md``
(selector x budget -> selected layers, selection tokens, held-out KL, perplexity, every evaluator
metric as mean +- std over seeds), ``OUT/compare_metrics.png`` (each metric against the softmax
budget, one line per selector) and ``OUT/compare_layers.png`` (selector x layer heat map: how
often each layer was selected). A killed compare resumes with ``--resume``: finished rows are kept
in ``OUT/checkpoints/rows.json`` and a selection in progress resumes from its probe checkpoint.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from hybridize.config import ComponentRef
from hybridize.errors import ConfigError
from hybridize.runconfig import RunConfig

DEFAULT_SELECTORS = ("kl-greedy-add", "kl-greedy-remove", "mse-greedy-add", "uniform", "random")


def _selectors(value: Any) -> list[ComponentRef]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"compare field 'selectors' must be a non-empty list of selector names or {{name: ..}} mappings; got {value!r}")
    return [ComponentRef.parse(v, where=f"compare field 'selectors'[{i}]") for i, v in enumerate(value)]


def _budgets(value: Any) -> list[int | float]:
    items = value if isinstance(value, (list, tuple)) else [value]
    ok = items and all((isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (isinstance(v, float) and 0 < v < 1) for v in items)
    if not ok:
        raise ConfigError(f"compare field 'softmax_layers' must be a list of K (int >= 1) or ratios in (0, 1); got {value!r}")
    return list(items)


def _seeds(value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(s, int) and not isinstance(s, bool) for s in items) or len(set(items)) != len(items):
        raise ConfigError(f"compare field 'seeds' must be a list of distinct ints; got {value!r}")
    return list(items)


@attrs.frozen(kw_only=True)
class CompareConfig:
    """The ``compare`` section.

    Args:
        selectors: selectors to compare (names or ``{name: .., **params}``).
        softmax_layers: budgets, each a K or a ratio; default: the run config's ``softmax_layers``.
        seeds: seeds to repeat over; default: the run config's ``seed``.
        save_models: also save every final hybrid under ``OUT/models/`` (off: only the table).
    """

    selectors: list[ComponentRef] = attrs.field(factory=lambda: [ComponentRef(name=n) for n in DEFAULT_SELECTORS], converter=_selectors)
    softmax_layers: list[int | float] | None = attrs.field(default=None, converter=lambda v: None if v is None else _budgets(v))
    seeds: list[int] | None = attrs.field(default=None, converter=lambda v: None if v is None else _seeds(v))
    save_models: bool = False


def load_compare_config(path: str | Path, overrides: Sequence[str] = (), *, pm: Any = None) -> tuple[RunConfig, CompareConfig]:
    """Read a run config with a ``compare`` section; every problem is reported together."""
    import yaml

    from hybridize.runconfig import apply_overrides, run_config_from_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of run fields; got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides)
    return compare_config_from_dict(tree, pm=pm)


def compare_config_from_dict(tree: Mapping[str, Any], *, pm: Any = None) -> tuple[RunConfig, CompareConfig]:
    """Split a config tree into the base run config and the compare section, validating both."""
    from hybridize.config import build_config
    from hybridize.runconfig import run_config_from_dict

    tree = dict(tree)
    section = tree.pop("compare", None) or {}
    problems: list[str] = []
    ccfg = None
    try:
        ccfg = build_config(CompareConfig, section, context="compare")
    except ConfigError as exc:
        problems += exc.problems
    base = None
    try:
        base = run_config_from_dict(tree, pm=pm)
    except ConfigError as exc:
        problems += exc.problems
    if ccfg is not None:
        if pm is None:
            from hybridize.plugins_manager import get_plugin_manager

            pm = get_plugin_manager()
        for ref in ccfg.selectors:
            try:
                pm.registry("selector")[ref.name].build_config(ref.params)
            except ConfigError as exc:
                problems += exc.problems
        if base is not None and isinstance(base.softmax_layers, list) and ccfg.softmax_layers is None:
            problems.append("compare needs budgets: set compare.softmax_layers (K or ratios) or a K / ratio in run field "
                            f"'softmax_layers' (got the explicit list {base.softmax_layers})")
    if problems:
        raise ConfigError(problems)
    return base, ccfg


def _final_hybrid(teacher: Any, data: Any, cfg: RunConfig, layers: list[int], stage1: dict[int, Any], *, pm: Any,
                  device: torch.device, ckpt_dir: Path, progress: bool) -> tuple[Any, dict[str, Any]]:
    """Surgery at ``layers``, linear layers from the shared stage 1, then stage 2 (and 3)."""
    from hybridize.distill import Distiller, linear_modules
    from hybridize.surgery import build_student

    torch.manual_seed(cfg.seed)
    student = build_student(teacher, layers, cfg.linear_attention.name, cfg.linear_attention.params, pm=pm)
    final_cfg = cfg.distill
    if stage1:
        for i, module in linear_modules(student).items():
            module.load_state_dict(stage1[i].state_dict())
        final_cfg = attrs.evolve(cfg.distill, stage1_tokens=0)
    distiller = Distiller(teacher=teacher, data=data, cfg=final_cfg, device=device, ckpt_dir=ckpt_dir, seed=cfg.seed, progress=progress)
    return student, distiller.run(student)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (selector, budget): selections per seed and each metric's mean and std over seeds."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["selector"], r["budget"]), []).append(r)
    out = []
    for (selector, budget), rs in groups.items():
        metric_names = list(dict.fromkeys(m for r in rs for m in r["metrics"]))
        out.append({
            "selector": selector, "budget": budget, "k": rs[0]["k"], "seeds": [r["seed"] for r in rs],
            "selections": [r["softmax_layers"] for r in rs],
            "selection_tokens": _mean_std([r["tokens"]["selection_cost"] for r in rs]),
            "metrics": {m: _mean_std([r["metrics"].get(m) for r in rs]) for m in metric_names},
        })
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (metrics as mean ± std over seeds)."""
    metric_names = list(dict.fromkeys(m for t in table for m in t["metrics"]))
    head = ["selector", "K", "selected layers (per seed)", "selection tokens"] + metric_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        n = len(t["seeds"])
        sels = "; ".join(",".join(map(str, s)) for s in t["selections"])
        tok = t["selection_tokens"][0]
        cells = [t["selector"], str(t["k"]), sels, f"{tok:,.0f}"] + [_fmt(*t["metrics"].get(m, (float("nan"), 0.0)), n) for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: metrics that describe the teacher, not the hybrid: drawn as a reference line, not as a series
_REFERENCE = {"student_ppl": "teacher_ppl"}
_LOWER_IS_BETTER = ("heldout_kl", "student_ppl", "kl", "ppl", "loss")


def _plotted_metrics(table: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys(m for t in table for m in t["metrics"]))
    return [m for m in names if m not in _REFERENCE.values()]


def plot_metrics(table: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Each hybrid metric per selector (mean, error bar = std over seeds).

    Several budgets: the metric against K, one line per selector. One budget: one bar per selector.
    The teacher's perplexity is a dashed reference line on the hybrid's.
    """
    from hybridize.outputs import _plt, _save_figure

    metric_names = _plotted_metrics(table)
    if not metric_names:
        return None
    plt = _plt()
    cols = min(3, len(metric_names))
    rows_n = math.ceil(len(metric_names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    selectors = list(dict.fromkeys(t["selector"] for t in table))
    colors = {s: f"C{i}" for i, s in enumerate(selectors)}
    ks = sorted({t["k"] for t in table})
    for ax, metric in zip(axes.flat, metric_names):
        if len(ks) == 1:
            means = [next((t["metrics"].get(metric, (float("nan"), 0.0)) for t in table if t["selector"] == s), (float("nan"), 0.0)) for s in selectors]
            ax.bar(range(len(selectors)), [m for m, _ in means], yerr=[sd for _, sd in means], capsize=4,
                   color=[colors[s] for s in selectors])
            ax.set_xticks(range(len(selectors)), selectors, rotation=20, ha="right", fontsize=8)
            for i, (m, sd) in enumerate(means):
                if not math.isnan(m):
                    ax.annotate(f"{m:.3g}", (i, m + sd), ha="center", va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
        else:
            span = max(1, ks[-1] - ks[0])
            for i, sel in enumerate(selectors):
                pts = sorted((t["k"], *t["metrics"].get(metric, (float("nan"), 0.0))) for t in table if t["selector"] == sel)
                x = [p[0] + (i - (len(selectors) - 1) / 2) * 0.02 * span for p in pts]  # dodge overlapping bars
                ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=sel, color=colors[sel])
            ax.set_xlabel("softmax layers K")
            ax.set_xticks(ks)
        ref = _REFERENCE.get(metric)
        ref_vals = [t["metrics"][ref][0] for t in table if ref and ref in t["metrics"] and not math.isnan(t["metrics"][ref][0])]
        if ref_vals:
            ax.axhline(statistics.fmean(ref_vals), color="gray", ls="--", lw=1, label="teacher")
            ax.legend(fontsize=7)
        ax.set_ylabel(metric)
        better = "lower" if any(metric.endswith(x) or metric == x for x in _LOWER_IS_BETTER) else "higher"
        ax.set_title(f"{metric}  ({better} is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(metric_names):]:
        ax.axis("off")
    if len(ks) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(title + f" (mean ± std over seeds; K = {', '.join(map(str, ks))})", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def plot_layers(rows: list[dict[str, Any]], n_layers: int, path: Path, title: str) -> Path:
    """Selector x layer heat map: the fraction of (seed, budget) runs in which each layer stayed softmax."""
    from hybridize.outputs import _plt, _save_figure

    plt = _plt()
    selectors = list(dict.fromkeys(r["selector"] for r in rows))
    freq = torch.zeros(len(selectors), n_layers)
    for r in rows:
        for layer in r["softmax_layers"]:
            freq[selectors.index(r["selector"]), layer] += 1
    counts = torch.tensor([sum(r["selector"] == s for r in rows) for s in selectors], dtype=torch.float).clamp_min(1)
    freq = freq / counts[:, None]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * n_layers + 3.5), 0.5 * len(selectors) + 1.8))
    im = ax.imshow(freq.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_yticks(range(len(selectors)), selectors)
    if n_layers <= 32:
        for i in range(len(selectors)):
            for j in range(n_layers):
                v = float(freq[i, j])
                ax.text(j, i, f"{v:.2g}" if v else "", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="fraction of runs with the layer softmax")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def compare(base: RunConfig, ccfg: CompareConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Run every selector at every budget and seed; write compare.json, compare.md and the plots.

    Returns:
        The content of ``OUT/compare.json``.
    """
    from hybridize.data import prepare_data
    from hybridize.evaluate import EvalTarget, run_evaluators
    from hybridize.modeling import save_hybrid
    from hybridize.outputs import check_resume_config, prepare_out_dir, write_json
    from hybridize.pipeline import resolve_device
    from hybridize.plugins_manager import get_plugin_manager
    from hybridize.select import SelectionEngine
    from hybridize.selection import resolve_budget
    from hybridize.teacher import decoder_layers, load_teacher

    out = prepare_out_dir(out, resume=resume, overwrite=overwrite)
    pm = get_plugin_manager()
    t0 = time.perf_counter()
    device = resolve_device(base.device)
    teacher = load_teacher(base.teacher, device=device)
    n_layers = len(decoder_layers(teacher.model))
    budgets = ccfg.softmax_layers or [base.softmax_layers]
    ks = {b: resolve_budget(b, n_layers) for b in budgets}  # errors before any work
    seeds = ccfg.seeds or [base.seed]
    config = {**base.to_dict(), "compare": {"selectors": [{"name": s.name, **s.params} for s in ccfg.selectors],
                                            "softmax_layers": budgets, "seeds": seeds, "save_models": ccfg.save_models}}
    check_resume_config(out, config)
    ckpt = out / "checkpoints"
    rows_path = ckpt / "rows.json"
    rows: list[dict[str, Any]] = json.loads(rows_path.read_text()) if resume and rows_path.exists() else []
    done = {(r["seed"], r["selector"], r["k"]) for r in rows}
    # tokens actually spent vs the sum of what each row would spend alone (selection cost = teacher-forward
    # + stage-1 tokens, as in result.json; final = stage-2 (+ stage-3) tokens of its final hybrid)
    spent = {"selection": 0, "final_distill": 0, "final_hybrids": 0}
    standalone = {"selection": 0, "final_distill": 0}
    for seed in seeds:
        todo = [(sel, b) for b in budgets for sel in ccfg.selectors if (seed, sel.name, ks[b]) not in done]
        if not todo:
            continue
        torch.manual_seed(seed)
        data = prepare_data(base.data, teacher.tokenizer, seed=seed)
        stage1: dict[int, Any] = {}
        stage1_cost: dict[str, int] = {}
        finals: dict[tuple[int, ...], dict[str, Any]] = {}
        for sel, budget in todo:
            k = ks[budget]
            cfg = attrs.evolve(base, seed=seed, softmax_layers=budget, selection=attrs.evolve(base.selection, selector=sel))
            engine = SelectionEngine(teacher=teacher.model, data=data, cfg=cfg.selection, distill=cfg.distill, variant=cfg.linear_attention,
                                     pm=pm, device=device, k=k, ckpt_dir=ckpt / f"seed{seed}" / f"k{k}" / sel.name, seed=seed,
                                     progress=progress, stage1_from=(stage1, stage1_cost) if stage1 else None)
            selection = engine.run()
            sel_tok = selection["tokens"]
            standalone["selection"] += sel_tok["selection_cost"]
            spent["selection"] += sel_tok["selection_cost"]
            if engine.stage1_shared:  # this selection reused the seed's stage 1: it did not spend it again
                spent["selection"] -= stage1_cost["stage1"] + stage1_cost["teacher_forward"]
            elif engine.stage1_modules:
                stage1, stage1_cost = engine.stage1_modules, engine.stage1_tokens()
            layers = selection["softmax_layers"]
            key = tuple(layers)
            if key not in finals:
                if not stage1:  # no selector so far needed stage 1: run the shared pass for the finals
                    stage1 = engine.shared_stage1()
                    stage1_cost = engine.stage1_tokens()
                    spent["selection"] += stage1_cost["stage1"] + stage1_cost["teacher_forward"]
                student, report = _final_hybrid(teacher.model, data, cfg, layers, stage1, pm=pm, device=device,
                                                ckpt_dir=ckpt / f"seed{seed}" / ("final-" + "-".join(map(str, layers))), progress=progress)
                target = EvalTarget(model=student, tokenizer=teacher.tokenizer, label=f"{layers}", teacher=teacher.model,
                                    heldout=data.heldout, progress=progress)
                evals = run_evaluators(cfg.evaluators, target, pm) if cfg.evaluators else {"metrics": {}, "evals": []}
                metrics = {k_: v for k_, v in report["metrics"].items() if k_ in ("heldout_kl", "student_ppl")}
                metrics.update(evals["metrics"])
                finals[key] = {"metrics": metrics, "stage2_tokens": report["tokens"]["stage2"] + report["tokens"]["stage3"],
                               "evals": evals["evals"], "teacher_ppl": report["metrics"].get("teacher_ppl")}
                spent["final_distill"] += finals[key]["stage2_tokens"]
                spent["final_hybrids"] += 1
                if ccfg.save_models:
                    save_hybrid(student.cpu(), out / "models" / f"seed{seed}" / "-".join(map(str, layers)), teacher.tokenizer)
                del student
            standalone["final_distill"] += finals[key]["stage2_tokens"]
            rows.append({
                "seed": seed, "selector": sel.name, "selector_params": dict(sel.params), "budget": budget, "k": k,
                "softmax_layers": layers, "scores": selection["scores"], "stop_step": selection["stop_step"],
                "tokens": {"selection_cost": sel_tok["selection_cost"], "probes": sel_tok["probes_total"],
                           "n_probes": sel_tok["n_probes"], "cost_ratio_vs_independent": sel_tok["cost_ratio"]},
                "metrics": finals[key]["metrics"], "teacher_ppl": finals[key]["teacher_ppl"],
            })
            write_json(rows_path, rows)
    table = aggregate(rows)
    result = {
        "teacher": base.teacher, "linear_attention": base.linear_attention.name, "n_layers": n_layers,
        "selectors": [s.name for s in ccfg.selectors], "budgets": budgets, "seeds": seeds,
        "table": table, "rows": rows,
        "tokens": {"spent": spent, "standalone_sum": standalone},
        "config": config,
        "plugins": pm.versions(), "device": str(device), "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    md = markdown_table(table)
    (out / "compare.md").write_text(md + "\n")
    write_json(out / "compare.json", result)
    title = f"{Path(base.teacher).name}: {base.linear_attention.name} hybrids"
    plot_metrics(table, out / "compare_metrics.png", title)
    plot_layers(rows, n_layers, out / "compare_layers.png", f"softmax layers chosen per selector\n{title}")
    return result
