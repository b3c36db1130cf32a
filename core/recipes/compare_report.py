"""What ``hybridize compare`` reports beyond its main table: labels, rank correlation, overlap of selections.

- :func:`rank_correlations`: each selection against the reference selector's (default
  ``kl-greedy-add``, GA-S2) at the same seed, budget and probe variant: the Spearman rank
  correlation of their per-layer scores, the Jaccard of their top-K sets, and the selection's
  token cost as a fraction of the reference's.
- :func:`overlaps`: the same selector with two probe variants (e.g. GDN vs GLA probes): the Jaccard
  of their top-K sets, the mean Jaccard of their trajectories (top-K set at each evaluation window,
  aligned by probe tokens) and the Spearman correlation of their scores.
- :func:`report_markdown`: both as Markdown, with a closing note per selector.
- :func:`aggregate`, :func:`markdown_table`, :func:`plot_metrics`, :func:`plot_layers`: the main table (mean ± std
  over seeds) and the plots.
"""
from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hybridize.selection.contract import jaccard, spearman


def label(ref: Any) -> str:
    """``name`` or ``name(key=value, ...)``: how a selector or variant is named in the table."""
    if not ref.params:
        return ref.name
    return f"{ref.name}(" + ", ".join(f"{k}={v}" for k, v in sorted(ref.params.items())) + ")"


def series(rows: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """id(row) -> plot label: the selector, plus ``[probes -> hybrid]`` when the rows cross variants."""
    combos = {(r.get("probe_variant"), r.get("final_variant")) for r in rows}
    crossing = len(combos) > 1 or any(p != f for p, f in combos)
    return {id(r): r["selector"] + (f" [{r.get('probe_variant')} -> {r.get('final_variant')}]" if crossing else "") for r in rows}


def _scores(row: Mapping[str, Any]) -> dict[int, float]:
    return {int(l): float(v) for l, v in row["scores"].items()}


def _selections(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    """One row per selection (seed, selector, K, probe variant): the rows of other final variants share it."""
    out: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in rows:
        out.setdefault((r["seed"], r["selector"], r["k"], r.get("probe_variant")), r)
    return out


def _fraction(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def rank_correlations(rows: Sequence[Mapping[str, Any]], reference: str) -> dict[str, Any]:
    """Every other selection against ``reference`` at the same seed, K and probe variant.

    Returns:
        ``{"reference": ..., "pairs": [per seed], "summary": [per selector, K, probe variant: means over seeds]}``.
    """
    sels = _selections(rows)
    pairs = []
    for (seed, selector, k, probe), row in sels.items():
        ref = sels.get((seed, reference, k, probe))
        if ref is None or selector == reference:
            continue
        t, rt = row["tokens"], ref["tokens"]
        pairs.append({
            "seed": seed, "selector": selector, "k": k, "probe_variant": probe,
            "spearman": spearman(_scores(row), _scores(ref)),
            "jaccard_top_k": jaccard(row["softmax_layers"], ref["softmax_layers"]),
            "selection_tokens_fraction": _fraction(t["selection_cost"], rt["selection_cost"]),
            "compute_fraction": _fraction(t.get("compute"), rt.get("compute")),
            "compute_beyond_stage1_fraction": _fraction(t.get("compute_beyond_stage1"), rt.get("compute_beyond_stage1")),
        })
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in pairs:
        groups.setdefault((p["selector"], p["k"], p["probe_variant"]), []).append(p)
    summary = [{"selector": s, "k": k, "probe_variant": pv, "seeds": [p["seed"] for p in ps],
                **{f: _mean([p[f] for p in ps]) for f in ("spearman", "jaccard_top_k", "selection_tokens_fraction",
                                                          "compute_fraction", "compute_beyond_stage1_fraction")}}
               for (s, k, pv), ps in groups.items()]
    present = any(key[1] == reference for key in sels)
    return {"reference": reference, "reference_present": present, "pairs": pairs, "summary": summary}


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def trajectory_jaccard(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]]) -> float:
    """Mean Jaccard of two top-K trajectories ``[[probe tokens, top_k], ...]``, aligned by probe tokens.

    At every window position of either trajectory, each contributes the last top-K set it had
    recorded by then; positions before either's first window are skipped.
    """
    def at(traj: Sequence[Sequence[Any]], x: int) -> list[int] | None:
        seen = [top for t, top in traj if t <= x]
        return seen[-1] if seen else None

    values = []
    for x in sorted({t for t, _ in a} | {t for t, _ in b}):
        sa, sb = at(a, x), at(b, x)
        if sa is not None and sb is not None:
            values.append(jaccard(sa, sb))
    return statistics.fmean(values) if values else math.nan


def overlaps(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The selections of each selector, seed and K under every pair of probe variants."""
    by_probe: dict[tuple[Any, ...], dict[str, Mapping[str, Any]]] = {}
    for (seed, selector, k, probe), row in _selections(rows).items():
        by_probe.setdefault((seed, selector, k), {})[probe] = row
    out = []
    for (seed, selector, k), variants in by_probe.items():
        for (pa, ra), (pb, rb) in itertools.combinations(variants.items(), 2):
            out.append({
                "seed": seed, "selector": selector, "k": k, "probe_variants": [pa, pb],
                "top_k": [ra["softmax_layers"], rb["softmax_layers"]],
                "jaccard_top_k": jaccard(ra["softmax_layers"], rb["softmax_layers"]),
                "jaccard_trajectory": trajectory_jaccard(ra.get("trajectory_top_k", []), rb.get("trajectory_top_k", [])),
                "spearman": spearman(_scores(ra), _scores(rb)),
            })
    return out


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report_markdown(correlation: Mapping[str, Any], overlap: Sequence[Mapping[str, Any]]) -> str:
    """The correlation and overlap blocks as Markdown, ending with the closing note."""
    lines: list[str] = []
    ref, summary = correlation["reference"], correlation["summary"]
    if summary:
        lines += ["", f"Against the reference `{ref}` (same seed, K and probe variant; means over seeds; token fractions: "
                  "this selection's cost / the reference's):", "",
                  "| selector | probes | K | Spearman of layer scores | Jaccard of top-K | selection tokens | all passes | beyond stage 1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in summary:
            lines.append(f"| {s['selector']} | {s['probe_variant']} | {s['k']} | {_num(s['spearman'])} | {_num(s['jaccard_top_k'], 2)} | "
                         f"{_num(s['selection_tokens_fraction'])} | {_num(s['compute_fraction'])} | {_num(s['compute_beyond_stage1_fraction'])} |")
    if overlap:
        lines += ["", "Probe variants: overlap of the selections of the same selector, seed and K:", "",
                  "| selector | seed | K | probes | top-K | Jaccard of top-K | mean Jaccard of trajectories | Spearman of scores |",
                  "|---|---|---|---|---|---|---|---|"]
        for o in overlap:
            pa, pb = o["probe_variants"]
            tops = " vs ".join(",".join(map(str, t)) for t in o["top_k"])
            lines.append(f"| {o['selector']} | {o['seed']} | {o['k']} | {pa} vs {pb} | {tops} | {_num(o['jaccard_top_k'], 2)} | "
                         f"{_num(o['jaccard_trajectory'], 2)} | {_num(o['spearman'])} |")
    if summary:
        multi = len({(s["k"], s["probe_variant"]) for s in summary}) > 1
        notes = [f"{s['selector']} {_num(s['spearman'], 2)}" + (f" (probes {s['probe_variant']}, K={s['k']})" if multi else "")
                 for s in summary]
        lines += ["", f"Closing note: Spearman rank correlation of each selector's per-layer scores with {ref}'s: " + "; ".join(notes) + "."]
    elif not correlation.get("reference_present", True):
        lines += ["", f"No rank correlation: the reference selector {ref!r} is not among the compared selectors."]
    return "\n".join(lines)


def stop_checks(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stop criterion against the full probe budget (rows of ``compare.verify_stop``): per selection and as
    means per (selector, K, probe variant): probe tokens saved, and whether the top-K at the stop is the full budget's."""
    per = [{"seed": r["seed"], "selector": r["selector"], "k": r["k"], "probe_variant": r.get("probe_variant"), **r["stop_check"]}
           for r in _selections(rows).values() if r.get("stop_check")]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in per:
        groups.setdefault((p["selector"], p["k"], p["probe_variant"]), []).append(p)
    summary = [{"selector": s, "k": k, "probe_variant": pv, "selections": len(ps), "stopped": sum(p["stopped"] for p in ps),
                "mean_saved_fraction": _mean([p["saved_fraction"] for p in ps]), "same_top_k": sum(p["same_top_k"] for p in ps)}
               for (s, k, pv), ps in groups.items()]
    return {"selections": per, "summary": summary}


def stop_markdown(checks: Mapping[str, Any], stop_name: str) -> str:
    """:func:`stop_checks` as Markdown (empty without checked rows)."""
    if not checks["selections"]:
        return ""
    lines = ["", f"Stop criterion `{stop_name}` against the whole probe budget (`compare.verify_stop`): probes trained to the "
             "budget once; each budget's selection is its top-K at the window where the criterion stopped:", "",
             "| selector | probes | K | seed | stop window / windows | tokens per probe at stop / budget | saved | top-K at stop | at budget | same |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in checks["selections"]:
        lines.append(f"| {p['selector']} | {p['probe_variant']} | {p['k']} | {p['seed']} | {p['stop_window'] or '-'} / {p['windows']} | "
                     f"{p['tokens_per_probe_at_stop']:,} / {p['tokens_per_probe_budget']:,} | {100 * p['saved_fraction']:.0f}% | "
                     f"{','.join(map(str, p['top_k_at_stop']))} | {','.join(map(str, p['top_k_at_budget']))} | {'yes' if p['same_top_k'] else 'no'} |")
    notes = [f"{s['selector']} K={s['k']}: saved {100 * (s['mean_saved_fraction'] or 0):.0f}% of the probe tokens on average, "
             f"stopped in {s['stopped']} of {s['selections']}, same top-K in {s['same_top_k']} of {s['selections']}" for s in checks["summary"]]
    return "\n" + "\n".join(lines + ["", "Stop check: " + "; ".join(notes) + "."])


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
            "selection_seconds": _mean_std([selection_seconds(r) for r in rs]),
            "metrics": {m: _mean_std([r["metrics"].get(m) for r in rs]) for m in metric_names},
        })
    return out


def selection_seconds(row: Mapping[str, Any]) -> float | None:
    """Wall seconds of a row's selection beyond the shared stage 1 (None for rows written before they were timed)."""
    sec = row.get("seconds") or {}
    if sec.get("selection") is None:
        return None
    return max(0.0, sec["selection"] - (sec.get("selection_stage1") or 0.0))


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (metrics as mean ± std over seeds).

    Selection tokens: teacher-forward + stage-1 tokens (``selection_cost``); all passes: every token
    of every forward pass of the selection, teacher or student (``compute``); selection s: its wall seconds
    beyond the shared stage 1 (:func:`selection_seconds`).
    """
    metric_names = list(dict.fromkeys(m for t in table for m in t["metrics"]))
    variants = len({(t.get("probe_variant"), t.get("final_variant")) for t in table}) > 1 or any(
        t.get("probe_variant") != t.get("final_variant") for t in table)
    compute = any(not math.isnan(t.get("selection_compute", (float("nan"),))[0]) for t in table)
    timed = any(not math.isnan(t.get("selection_seconds", (float("nan"),))[0]) for t in table)
    head = ["selector"] + (["probes -> hybrid"] if variants else []) + ["K", "selected layers (per seed)", "selection tokens"]
    head += (["all passes"] if compute else []) + (["selection s"] if timed else []) + metric_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        n = len(t["seeds"])
        sels = "; ".join(",".join(map(str, s)) for s in t["selections"])
        cells = [t["selector"]] + ([f"{t.get('probe_variant')} -> {t.get('final_variant')}"] if variants else [])
        cells += [str(t["k"]), sels, f"{t['selection_tokens'][0]:,.0f}"]
        if compute:
            c = t.get("selection_compute", (float("nan"),))[0]
            cells.append("-" if math.isnan(c) else f"{c:,.0f}")
        if timed:
            sec = t.get("selection_seconds", (float("nan"),))[0]
            cells.append("-" if math.isnan(sec) else f"{sec:.1f}")
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

    import torch

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
