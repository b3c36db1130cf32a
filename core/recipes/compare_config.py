"""The ``compare`` section of a compare config: selectors, budgets, seeds, variants, the stop check.

:class:`CompareConfig` is validated with every other problem of the config (one ``ConfigError``);
:func:`compare_config_from_dict` splits a config tree into the base run config and this section.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from hybridize.errors import ConfigError
from hybridize.recipes.compare_report import label
from hybridize.recipes.runconfig import RunConfig
from hybridize.registry.configs import ComponentRef

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
        verify_stop: train each probe selection (kl-greedy-add, kl-greedy-remove, ...) to the whole
            ``selection.probe_tokens`` once per seed and probe variant, and replay its stop criterion per budget
            (:func:`hybridize.selection.budgets.budget_view`): the selection is still the top-K at the stop
            window, its tokens and seconds those spent up to it, and its row's ``stop_check`` says at which
            window it stopped, the probe tokens that saved, and whether its top-K equals the full budget's.
            One probe run then serves every budget (probes do not depend on K).
    """

    selectors: list[ComponentRef] = attrs.field(factory=lambda: [ComponentRef(name=n) for n in DEFAULT_SELECTORS], converter=_selectors)
    softmax_layers: list[int | float] | None = attrs.field(default=None, converter=lambda v: None if v is None else _budgets(v))
    seeds: list[int] | None = attrs.field(default=None, converter=lambda v: None if v is None else _seeds(v))
    save_models: bool = False
    probe_variants: list[ComponentRef] | None = attrs.field(default=None, converter=lambda v: None if v is None else _variants(v, "probe_variants"))
    final_variants: list[ComponentRef] | None = attrs.field(default=None, converter=lambda v: None if v is None else _variants(v, "final_variants"))
    reference: str = "kl-greedy-add"
    verify_stop: bool = False


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
