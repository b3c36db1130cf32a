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

from hybridize.recipes.compare_report import label, overlaps, rank_correlations, report_markdown, series
from hybridize.registry.configs import ComponentRef
from hybridize.errors import ConfigError
from hybridize.recipes.outputs import write_json
from hybridize.recipes.runconfig import RunConfig

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


def _variants(value: Any, field: str) -> list[ComponentRef]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"compare field {field!r} must be a non-empty list of variant names or {{name: ..}} mappings; got {value!r}")
    refs = [ComponentRef.parse(v, where=f"compare field {field!r}[{i}]") for i, v in enumerate(value)]
    labels = [label(r) for r in refs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare field {field!r} must not repeat a variant; got {labels}")
    return refs


@attrs.frozen(kw_only=True)
class CompareConfig:
    """The ``compare`` section.

    Args:
        selectors: selectors to compare (names or ``{name: .., **params}``; the params may include the
            distance options, e.g. ``{name: kl-greedy-add, min_gap: 2}`` beside plain ``kl-greedy-add``).
        softmax_layers: budgets, each a K or a ratio; default: the run config's ``softmax_layers``.
        seeds: seeds to repeat over; default: the run config's ``seed``.
        save_models: also save every final hybrid under ``OUT/models/`` (off: only the table).
        probe_variants: linear-attention variants of the probes (names or ``{name: .., **params}``);
            default: the run config's ``selection.linear_attention`` (else its ``linear_attention``).
        final_variants: variants of the final hybrids, crossed with ``probe_variants``; default: the
            run config's ``linear_attention``.
        reference: the selector (as labelled in the table) the others are correlated with; rows of
            other selectors get no correlation when it is not among ``selectors``.
    """

    selectors: list[ComponentRef] = attrs.field(factory=lambda: [ComponentRef(name=n) for n in DEFAULT_SELECTORS], converter=_selectors)
    softmax_layers: list[int | float] | None = attrs.field(default=None, converter=lambda v: None if v is None else _budgets(v))
    seeds: list[int] | None = attrs.field(default=None, converter=lambda v: None if v is None else _seeds(v))
    save_models: bool = False
    probe_variants: list[ComponentRef] | None = attrs.field(default=None, converter=lambda v: None if v is None else _variants(v, "probe_variants"))
    final_variants: list[ComponentRef] | None = attrs.field(default=None, converter=lambda v: None if v is None else _variants(v, "final_variants"))
    reference: str = "kl-greedy-add"


def load_compare_config(path: str | Path, overrides: Sequence[str] = (), *, pm: Any = None) -> tuple[RunConfig, CompareConfig]:
    """Read a run config with a ``compare`` section; every problem is reported together."""
    from hybridize.recipes.runconfig import apply_overrides
    from hybridize.recipes.yamlio import read_yaml_file

    path = Path(path)
    tree = read_yaml_file(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of run fields; got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides)
    return compare_config_from_dict(tree, pm=pm)


def compare_config_from_dict(tree: Mapping[str, Any], *, pm: Any = None) -> tuple[RunConfig, CompareConfig]:
    """Split a config tree into the base run config and the compare section, validating both."""
    from hybridize.registry.configs import build_config
    from hybridize.recipes.runconfig import run_config_from_dict

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
            from hybridize.registry.manager import get_plugin_manager

            pm = get_plugin_manager()
        problems += _check_components(ccfg, pm)
        if base is not None and isinstance(base.softmax_layers, list) and ccfg.softmax_layers is None:
            problems.append("compare needs budgets: set compare.softmax_layers (K or ratios) or a K / ratio in run field "
                            f"'softmax_layers' (got the explicit list {base.softmax_layers})")
    if problems:
        raise ConfigError(problems)
    return base, ccfg


def _check_components(ccfg: CompareConfig, pm: Any) -> list[str]:
    """Every selector (with its distance options) and every variant must exist and accept its params."""
    from hybridize.selection.contract import build_selector_configs

    problems = []
    checks = [("selector", "", ref) for ref in ccfg.selectors]
    checks += [("linear_attention", f"compare field {field!r}: ", ref) for field in ("probe_variants", "final_variants")
               for ref in getattr(ccfg, field) or []]
    for kind, where, ref in checks:
        try:
            entry = pm.registry(kind)[ref.name]
            build_selector_configs(entry, ref.params) if kind == "selector" else entry.build_config(ref.params)
        except ConfigError as exc:
            problems += [where + p for p in exc.problems]
    labels = [label(r) for r in ccfg.selectors]
    if len(set(labels)) != len(labels):
        problems.append(f"compare field 'selectors' must not repeat a selector with the same params; got {labels}")
    return problems


def _stage1_pass(teacher: Any, data: Any, cfg: RunConfig, variant: ComponentRef, *, pm: Any, device: torch.device,
                 ckpt_dir: Path, progress: bool) -> tuple[dict[int, Any], dict[str, int]]:
    """The shared stage 1 of one variant (as a selection engine runs it): all-linear student, all layers at once."""
    from hybridize.distill.stages import Distiller, linear_modules
    from hybridize.model.surgery import build_student

    torch.manual_seed(cfg.seed)
    student = build_student(teacher, [], variant.name, variant.params, pm=pm).to(device)
    distiller = Distiller(teacher=teacher, data=data, cfg=cfg.distill, device=device, ckpt_dir=ckpt_dir, seed=cfg.seed, progress=progress)
    distiller.stage1(student)
    modules = {i: m.requires_grad_(False) for i, m in linear_modules(student).items()}
    return modules, {"stage1": distiller.tokens["stage1"], "teacher_forward": distiller.tokens["teacher_forward"]}


def _final_hybrid(teacher: Any, data: Any, cfg: RunConfig, layers: list[int], stage1: dict[int, Any], *, pm: Any,
                  device: torch.device, ckpt_dir: Path, progress: bool) -> tuple[Any, dict[str, Any]]:
    """Surgery at ``layers``, linear layers from the shared stage 1, then stage 2 (and 3)."""
    from hybridize.distill.stages import Distiller, linear_modules
    from hybridize.model.surgery import build_student

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
    """One entry per (selector, probe variant, final variant, budget): selections per seed, each metric's mean and std over seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["selector"], r.get("probe_variant"), r.get("final_variant"), r["budget"]), []).append(r)
    names = series(rows)
    out = []
    for (selector, probe, final, budget), rs in groups.items():
        metric_names = list(dict.fromkeys(m for r in rs for m in r["metrics"]))
        out.append({
            "selector": selector, "probe_variant": probe, "final_variant": final, "series": names[id(rs[0])],
            "budget": budget, "k": rs[0]["k"], "seeds": [r["seed"] for r in rs],
            "selections": [r["softmax_layers"] for r in rs],
            "selection_tokens": _mean_std([r["tokens"]["selection_cost"] for r in rs]),
            "selection_compute": _mean_std([r["tokens"].get("compute") for r in rs]),
            "metrics": {m: _mean_std([r["metrics"].get(m) for r in rs]) for m in metric_names},
        })
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (metrics as mean ± std over seeds).

    Selection tokens: teacher-forward + stage-1 tokens (``selection_cost``); all passes: every token
    of every forward pass of the selection, teacher or student (``compute``).
    """
    metric_names = list(dict.fromkeys(m for t in table for m in t["metrics"]))
    variants = len({(t.get("probe_variant"), t.get("final_variant")) for t in table}) > 1 or any(
        t.get("probe_variant") != t.get("final_variant") for t in table)
    compute = any(not math.isnan(t.get("selection_compute", (float("nan"),))[0]) for t in table)
    head = ["selector"] + (["probes -> hybrid"] if variants else []) + ["K", "selected layers (per seed)", "selection tokens"]
    head += (["all passes"] if compute else []) + metric_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        n = len(t["seeds"])
        sels = "; ".join(",".join(map(str, s)) for s in t["selections"])
        cells = [t["selector"]] + ([f"{t.get('probe_variant')} -> {t.get('final_variant')}"] if variants else [])
        cells += [str(t["k"]), sels, f"{t['selection_tokens'][0]:,.0f}"]
        if compute:
            c = t.get("selection_compute", (float("nan"),))[0]
            cells.append("-" if math.isnan(c) else f"{c:,.0f}")
        cells += [_fmt(*t["metrics"].get(m, (float("nan"), 0.0)), n) for m in metric_names]
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
    from hybridize.recipes.outputs import _plt, _save_figure

    metric_names = _plotted_metrics(table)
    if not metric_names:
        return None
    plt = _plt()
    cols = min(3, len(metric_names))
    rows_n = math.ceil(len(metric_names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    selectors = list(dict.fromkeys(t["series"] for t in table))
    colors = {s: f"C{i}" for i, s in enumerate(selectors)}
    ks = sorted({t["k"] for t in table})
    for ax, metric in zip(axes.flat, metric_names):
        if len(ks) == 1:
            means = [next((t["metrics"].get(metric, (float("nan"), 0.0)) for t in table if t["series"] == s), (float("nan"), 0.0)) for s in selectors]
            ax.bar(range(len(selectors)), [m for m, _ in means], yerr=[sd for _, sd in means], capsize=4,
                   color=[colors[s] for s in selectors])
            ax.set_xticks(range(len(selectors)), selectors, rotation=20, ha="right", fontsize=8)
            for i, (m, sd) in enumerate(means):
                if not math.isnan(m):
                    ax.annotate(f"{m:.3g}", (i, m + sd), ha="center", va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
            tops = [m + sd for m, sd in means if not math.isnan(m)]
            if tops and max(tops) > 0:  # room above the tallest error bar for its label
                ax.set_ylim(top=max(tops) * 1.14)
        else:
            span = max(1, ks[-1] - ks[0])
            for i, sel in enumerate(selectors):
                pts = sorted((t["k"], *t["metrics"].get(metric, (float("nan"), 0.0))) for t in table if t["series"] == sel)
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
    from hybridize.recipes.outputs import _plt, _save_figure

    plt = _plt()
    names = series(rows)
    selectors = list(dict.fromkeys(names[id(r)] for r in rows))
    freq = torch.zeros(len(selectors), n_layers)
    for r in rows:
        for layer in r["softmax_layers"]:
            freq[selectors.index(names[id(r)]), layer] += 1
    counts = torch.tensor([sum(names[id(r)] == s for r in rows) for s in selectors], dtype=torch.float).clamp_min(1)
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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


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
    checked_data: dict[int, Any] = attrs.Factory(dict)  # seed -> the data the preflight already packed
    # tokens actually spent vs the sum of what each row would spend alone (selection cost = teacher-forward
    # + stage-1 tokens, as in result.json; final = stage-2 (+ stage-3) tokens of its final hybrid, plus the
    # stage 1 of its variant where its selection did not already run it)
    spent: dict[str, int] = attrs.Factory(lambda: {"selection": 0, "final_stage1": 0, "final_distill": 0, "final_hybrids": 0})
    standalone: dict[str, int] = attrs.Factory(lambda: {"selection": 0, "final_stage1": 0, "final_distill": 0})

    def __attrs_post_init__(self) -> None:
        self.done = {self._key(r["seed"], r["selector"], r["k"], r.get("probe_variant"), r.get("final_variant")) for r in self.rows}
        self.probes = self.ccfg.probe_variants or [self.base.selection.linear_attention or self.base.linear_attention]
        self.finals = self.ccfg.final_variants or [self.base.linear_attention]

    @staticmethod
    def _key(*parts: Any) -> tuple[Any, ...]:
        return tuple(parts)

    def run_seed(self, seed: int) -> None:
        """Every selection of one seed (one per selector, budget and probe variant) and the final hybrids it needs."""
        from hybridize.training.data import prepare_data

        self.data, self.stage1, self.final_cache = None, {}, {}
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
        from hybridize.selection.engine import SelectionEngine

        k, pvl = self.ks[budget], label(pv)
        cfg = attrs.evolve(self.base, seed=seed, softmax_layers=budget,
                           selection=attrs.evolve(self.base.selection, selector=sel, linear_attention=pv))
        engine = SelectionEngine(teacher=self.teacher.model, data=self.data, cfg=cfg.selection, distill=cfg.distill, variant=pv,
                                 pm=self.pm, device=self.device, k=k, seed=seed, progress=self.progress,
                                 ckpt_dir=self.out / "checkpoints" / f"seed{seed}" / f"k{k}" / _slug(pvl) / _slug(label(sel)),
                                 stage1_from=self.stage1.get(pvl))
        selection = engine.run()
        cost = selection["tokens"]["selection_cost"]
        self.standalone["selection"] += cost
        self.spent["selection"] += cost
        if engine.stage1_shared:  # this selection reused the seed's stage 1 of its variant: it did not spend it again
            s1 = self.stage1[pvl][1]
            self.spent["selection"] -= s1["stage1"] + s1["teacher_forward"]
        elif engine.stage1_modules:
            self.stage1[pvl] = (engine.stage1_modules, engine.stage1_tokens())
        for fv in finals:
            final = self._final(cfg, fv, selection["softmax_layers"])
            if not (engine.stage1_modules and label(fv) == pvl):  # alone, this row's final would run its own stage 1
                s1 = self.stage1[label(fv)][1]
                self.standalone["final_stage1"] += s1["stage1"] + s1["teacher_forward"]
            self.standalone["final_distill"] += final["stage2_tokens"]
            self.rows.append(self._row(cfg, sel, pv, fv, selection, final))
            write_json(self.out / "checkpoints" / "rows.json", self.rows)

    def _final(self, cfg: RunConfig, fv: ComponentRef, layers: list[int]) -> dict[str, Any]:
        """The final hybrid of variant ``fv`` at ``layers`` (shared by every selection that picks them), evaluated."""
        from hybridize.evaluate import EvalTarget, merge_metrics, run_evaluators
        from hybridize.model.hybrid import save_hybrid

        fvl, key = label(fv), (label(fv), tuple(layers))
        if key in self.final_cache:
            return self.final_cache[key]
        seed_dir = self.out / "checkpoints" / f"seed{cfg.seed}"
        cfg = attrs.evolve(cfg, linear_attention=fv)
        if fvl not in self.stage1:  # no selection so far ran this variant's stage 1: run the shared pass for the finals
            self.stage1[fvl] = _stage1_pass(self.teacher.model, self.data, cfg, fv, pm=self.pm, device=self.device,
                                            ckpt_dir=seed_dir / f"stage1-{_slug(fvl)}", progress=self.progress)
            self.spent["final_stage1"] += self.stage1[fvl][1]["stage1"] + self.stage1[fvl][1]["teacher_forward"]
        name = f"{_slug(fvl)}-" + "-".join(map(str, layers))
        student, report = _final_hybrid(self.teacher.model, self.data, cfg, layers, self.stage1[fvl][0], pm=self.pm, device=self.device,
                                        ckpt_dir=seed_dir / f"final-{name}", progress=self.progress)
        target = EvalTarget(model=student, tokenizer=self.teacher.tokenizer, label=f"{fvl} {layers}", teacher=self.teacher.model,
                            heldout=self.data.heldout, progress=self.progress)
        evals = run_evaluators(cfg.evaluators, target, self.pm) if cfg.evaluators else {"metrics": {}, "evals": []}
        own = {k_: v for k_, v in report["metrics"].items() if k_ in ("heldout_kl", "student_ppl", "teacher_ppl")}
        metrics = {k_: v for k_, v in merge_metrics(own, evals["evals"]).items() if k_ != "teacher_ppl"}
        self.final_cache[key] = {"metrics": metrics, "stage2_tokens": report["tokens"]["stage2"] + report["tokens"]["stage3"],
                                 "evals": evals["evals"], "teacher_ppl": report["metrics"].get("teacher_ppl")}
        self.spent["final_distill"] += self.final_cache[key]["stage2_tokens"]
        self.spent["final_hybrids"] += 1
        if self.ccfg.save_models:
            save_hybrid(student.cpu(), self.out / "models" / f"seed{cfg.seed}" / name, self.teacher.tokenizer)
        return self.final_cache[key]

    @staticmethod
    def _row(cfg: RunConfig, sel: ComponentRef, pv: ComponentRef, fv: ComponentRef, selection: dict[str, Any],
             final: dict[str, Any]) -> dict[str, Any]:
        t = selection["tokens"]
        return {
            "seed": cfg.seed, "selector": label(sel), "selector_name": sel.name, "selector_params": dict(sel.params),
            "probe_variant": label(pv), "final_variant": label(fv), "budget": cfg.softmax_layers, "k": selection["k"],
            "softmax_layers": selection["softmax_layers"], "scores": selection["scores"], "raw_scores": selection["raw_scores"],
            "stop_step": selection["stop_step"],
            "trajectory_top_k": [[w["tokens_per_probe"], w["top_k"]] for w in selection["trajectory"]],
            "tokens": {"selection_cost": t["selection_cost"], "probes": t["probes_total"], "n_probes": t["n_probes"],
                       "cost_ratio_vs_independent": t["cost_ratio"], "stage1": t["stage1"], "teacher_forward": t["teacher_forward"],
                       "teacher_backward": t["teacher_backward"], "eval_forward": t["eval_forward"],
                       "compute": t["compute"], "compute_beyond_stage1": t["compute_beyond_stage1"]},
            "metrics": final["metrics"], "teacher_ppl": final["teacher_ppl"],
        }


def compare(base: RunConfig, ccfg: CompareConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Run every selector at every budget, probe variant and seed, each with every final variant; write
    compare.json, compare.md and the plots.

    Returns:
        The content of ``OUT/compare.json``.
    """
    from hybridize.recipes.outputs import check_out_dir, check_resume_config
    from hybridize.recipes.rundir import prepare_out_dir, run_inputs
    from hybridize.training.devices import resolve_device
    from hybridize.registry.manager import get_plugin_manager
    from hybridize.recipes.preflight import check_run
    from hybridize.model.teacher import load_teacher

    pm = get_plugin_manager()
    t0 = time.perf_counter()
    budgets = ccfg.softmax_layers or [base.softmax_layers]
    check_out_dir(out, resume=resume, overwrite=overwrite, inputs=run_inputs(base))  # read-only: refuse a full OUT before the slow checks
    checked = check_run(base, pm, command="compare", budgets=budgets, selectors=ccfg.selectors, seed=(ccfg.seeds or [base.seed])[0])
    ks = {b: checked.k(b) for b in budgets}
    device = resolve_device(base.device)
    teacher = load_teacher(base.teacher, device=device)
    n_layers = checked.teacher.n_layers
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
                      checked_data={checked.seed: checked.data})
    for seed in seeds:
        run.run_seed(seed)
    return _write_outputs(run, n_layers, budgets, seeds, config, time.perf_counter() - t0)


def _write_outputs(run: _Comparison, n_layers: int, budgets: list[Any], seeds: list[int], config: dict[str, Any],
                   seconds: float) -> dict[str, Any]:
    """compare.json, compare.md (table, correlation with the reference, probe-variant overlap, closing note), plots."""
    base, rows, out = run.base, run.rows, run.out
    table = aggregate(rows)
    correlation = rank_correlations(rows, run.ccfg.reference)
    overlap = overlaps(rows)
    result = {
        "teacher": base.teacher, "linear_attention": base.linear_attention.name, "n_layers": n_layers,
        "selectors": [label(s) for s in run.ccfg.selectors], "budgets": budgets, "seeds": seeds,
        "probe_variants": [label(v) for v in run.probes], "final_variants": [label(v) for v in run.finals],
        "table": table, "rows": rows, "rank_correlation": correlation, "overlap": overlap,
        "tokens": {"spent": run.spent, "standalone_sum": run.standalone},
        "config": config,
        "plugins": run.pm.versions(), "device": str(run.device), "wall_seconds": round(seconds, 1),
    }
    (out / "compare.md").write_text(markdown_table(table) + "\n" + report_markdown(correlation, overlap) + "\n")
    write_json(out / "compare.json", result)
    variants = sorted({label(v) for v in run.finals})
    title = f"{Path(base.teacher).name}: {', '.join(variants)} hybrids"
    plot_metrics(table, out / "compare_metrics.png", title)
    plot_layers(rows, n_layers, out / "compare_layers.png", f"softmax layers chosen per selector\n{title}")
    return result
