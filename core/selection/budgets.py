"""One probe run, several softmax budgets: a selection's record at any K, read off a run trained to its full budget.

A probe selector's probes do not depend on K (``plan(n_layers)``); only the importance, the top-K choice and the
stop criterion do. So one probe run trained to the whole ``selection.probe_tokens`` (the engine's
``run_to_budget``) holds, window by window, the raw scores every budget needs: :func:`budget_view` replays the
importance, the choice and a fresh stop criterion for budget K over that trajectory and returns the record a
selection at K that stopped on its own criterion would have returned (training before the stop is the same:
probes step in lockstep on the same batches whatever the criterion decides). Its ``tokens`` and ``seconds`` are
those spent up to that stop window; its ``stop_check`` compares the top-K at the stop with the top-K at the full
budget, which is what the stop criterion's saving is worth.

Also here, as pure functions the engine uses too: :func:`importance_of` (the selector's importance without the
probes that failed) and :func:`token_report` (the selection-cost figures of result.json).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from hybridize.errors import HybridizeError
from hybridize.selection.components import Components, SelectionConfig
from hybridize.selection.contract import choose, jaccard, rank


def importance_of(selector: Any, raw: Mapping[int, float], n_layers: int, k: int, failed: Collection[int]) -> dict[int, float]:
    """The selector's importance of the healthy layers (failed probes are left out of the ranking)."""
    if not failed:
        return selector.importance(raw, n_layers, k)
    healthy = {l: v for l, v in raw.items() if l not in failed}
    if len(healthy) < k:
        raise HybridizeError(
            f"only {len(healthy)} probe(s) finished with finite scores (failed: layers {sorted(failed)}), fewer than "
            f"K={k}; lower selection.probe_lr_attn / probe_lr_other and run the command again with --overwrite "
            "(failed probes cannot be resumed), or check the data"
        )
    fill = sum(healthy.values()) / len(healthy)  # a neutral stand-in so the selector sees every layer
    importance = selector.importance({**healthy, **dict.fromkeys(failed, fill)}, n_layers, k)
    return {l: v for l, v in importance.items() if l not in failed}


def token_report(tokens: Mapping[str, int], *, n_probes: int, heldout_teacher: int, stage1_teacher: int) -> dict[str, Any]:
    """Tokens spent, and what an independent per-probe pipeline would spend at equal probe tokens.

    ``selection_cost`` = teacher-forward + stage-1 tokens; the paper's scripts give every probe its own stage 1
    (training and teacher forwards), its own teacher forwards for its probe tokens and for its held-out evaluation
    (``independent_pipeline_equivalent``); ``compute`` counts every token of every forward pass, teacher or
    student (training passes also run a backward): the cost that compares probe selectors with teacher-only
    proxies; ``compute_beyond_stage1`` leaves out the stage-1 pass the final hybrid needs anyway.
    """
    t = dict(tokens)
    n, s1, each = n_probes, t["stage1"], t["probe_each"]
    ours = t["teacher_forward"] + s1
    indep = n * (2 * s1 + each + heldout_teacher) if n else ours
    t.update(n_probes=n, selection_cost=ours, independent_pipeline_equivalent=indep,
             cost_ratio=round(ours / indep, 4) if indep else 1.0)
    t["compute"] = t["teacher_forward"] + s1 + t["probes_total"] + t["eval_forward"]
    t["compute_beyond_stage1"] = t["compute"] - s1 - stage1_teacher
    return t


def _replay(parts: Components, windows: list[dict[str, Any]], n_layers: int, k: int, failed: Collection[int]
            ) -> tuple[list[dict[str, Any]], int | None]:
    """Every window re-ranked for budget ``k``, and the index of the first window the stop criterion accepts."""
    out: list[dict[str, Any]] = []
    stop_at = None
    for w in windows:
        raw = {int(l): float(v) for l, v in w["raw"].items()}
        importance = importance_of(parts.selector, raw, n_layers, k, failed)
        top = choose(importance, k, parts.choice)
        prev = out[-1]["top_k"] if out else None
        out.append({**w, "raw": raw, "importance": importance, "top_k": top,
                    "jaccard_prev": None if prev is None else jaccard(prev, top)})
        if stop_at is None and parts.stop.update(frozenset(top)):
            stop_at = len(out) - 1
    return out, stop_at


def budget_view(record: Mapping[str, Any], k: int, *, cfg: SelectionConfig, pm: Any, seed: int, n_layers: int) -> dict[str, Any]:
    """The record of a selection at budget ``k`` that stopped on its own criterion, from a probe run's record
    (``SelectionEngine(run_to_budget=True).run()``), with ``stop_check`` against the run's full budget."""
    windows = record["trajectory"]
    if not windows or "spent" not in windows[0]:
        raise HybridizeError("budget_view needs the record of a probe selection run with run_to_budget=True")
    parts = Components.build(cfg, pm, seed=seed, k=k)
    parts.choice.check(n_layers, k, cfg.selector.name)
    replayed, stop_at = _replay(parts, windows, n_layers, k, record.get("failed_layers", ()))
    used = replayed[: stop_at + 1] if stop_at is not None else replayed
    final, last = used[-1], replayed[-1]
    clock = list(record.get("window_seconds") or [])
    clock += [clock[-1] if clock else 0.0] * (len(replayed) - len(clock))  # a window without its time (never on one run)
    spent, split = final["spent"], record["token_split"]
    n = record["tokens"]["n_probes"]
    tokens = token_report({**record["tokens"], "teacher_forward": spent["teacher_forward"] + split["heldout_teacher"],
                           "eval_forward": spent["eval_forward"], "probe_each": final["tokens_per_probe"],
                           "probes_total": final["tokens_per_probe"] * n},
                          n_probes=n, heldout_teacher=split["heldout_teacher"], stage1_teacher=split["stage1_teacher"])
    budget_tokens = last["tokens_per_probe"]
    check = {"stopped": stop_at is not None, "stop_window": None if stop_at is None else stop_at + 1, "windows": len(replayed),
             "tokens_per_probe_at_stop": final["tokens_per_probe"], "tokens_per_probe_budget": budget_tokens,
             "saved_fraction": round(1 - final["tokens_per_probe"] / budget_tokens, 4) if budget_tokens else 0.0,
             "top_k_at_stop": final["top_k"], "top_k_at_budget": last["top_k"],
             "same_top_k": sorted(final["top_k"]) == sorted(last["top_k"]),
             "seconds_at_stop": clock[len(used) - 1], "seconds_budget": clock[-1]}
    return {**record, "softmax_layers": final["top_k"], "k": k, "ranking": rank(final["importance"]),
            "scores": final["importance"], "raw_scores": final["raw"], "trajectory": used,
            "stop_step": final["step"] if stop_at is not None else None, "tokens": tokens, "seconds": clock[len(used) - 1], "window_seconds": clock[: len(used)],
            "stop_check": check}
