"""What ``hybridize compare`` reports beyond its main table: labels, rank correlation, overlap of selections.

- :func:`rank_correlations`: each selection against the reference selector's (default
  ``kl-greedy-add``, GA-S2) at the same seed, budget and probe variant: the Spearman rank
  correlation of their per-layer scores, the Jaccard of their top-K sets, and the selection's
  token cost as a fraction of the reference's.
- :func:`overlaps`: the same selector with two probe variants (e.g. GDN vs GLA probes): the Jaccard
  of their top-K sets, the mean Jaccard of their trajectories (top-K set at each evaluation window,
  aligned by probe tokens) and the Spearman correlation of their scores.
- :func:`report_markdown`: both as Markdown, with a closing note per selector.
"""
from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
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
