"""The run configuration (YAML): teacher, data, variant, softmax layers, distillation budgets, seed.

Every problem in a config is collected into one :class:`~hybridize.errors.ConfigError` that names
the field and the fix. ``--set a.b=value`` overrides parse ``value`` as YAML.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from hybridize.registry.configs import ComponentRef, build_config, check_type, config_to_dict
from hybridize.training.data import DataConfig
from hybridize.training.devices import device_problem
from hybridize.distill.stages import DistillConfig
from hybridize.errors import ConfigError
from hybridize.selection.engine import SelectionConfig
from hybridize.recipes.yamlio import parse_yaml, read_yaml_file

SoftmaxLayers = int | float | list[int]


@attrs.frozen(kw_only=True)
class RunConfig:
    """A resolved run configuration.

    Args:
        teacher: local directory or hub id of the teacher.
        data: the data section (:class:`~hybridize.training.data.DataConfig`).
        linear_attention: the variant of the final hybrid and its params, e.g. ``{name: gdn, use_short_conv: true}``;
            also the probes' variant unless ``selection.linear_attention`` names another (e.g. GDN probes
            choosing the layers of a GLA hybrid).
        softmax_layers: K (int), a ratio in (0, 1), or an explicit list of layer indices.
        selection: how layers are selected when ``softmax_layers`` is K or a ratio
            (:class:`~hybridize.selection.engine.SelectionConfig`).
        distill: stage budgets (:class:`~hybridize.distill.stages.DistillConfig`).
        seed: seed of data order and initialisation.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        evaluators: evaluators run on the final hybrid, e.g. ``[{name: heldout-kl}, {name: lm-eval, tasks: [niah_single_1]}]``;
            their metrics join result.json ``metrics``.
    """

    teacher: str
    data: DataConfig
    linear_attention: ComponentRef = ComponentRef(name="gdn")
    softmax_layers: SoftmaxLayers = 0.25
    selection: SelectionConfig = SelectionConfig()
    distill: DistillConfig = DistillConfig()
    seed: int = 0
    device: str = "auto"
    evaluators: list[ComponentRef] = attrs.Factory(list)

    def to_dict(self) -> dict[str, Any]:
        out = config_to_dict(self)
        out["linear_attention"] = _ref(self.linear_attention)
        sel = self.selection
        out["selection"].update(selector=_ref(sel.selector), scorer=sel.scorer and _ref(sel.scorer), stop=_ref(sel.stop),
                                linear_attention=sel.linear_attention and _ref(sel.linear_attention))
        out["evaluators"] = [_ref(r) for r in self.evaluators]
        return out


def _ref(ref: ComponentRef) -> dict[str, Any]:
    return {"name": ref.name, **ref.params}


def _check_softmax_layers(value: Any) -> list[str]:
    rule = "be an int K >= 1, a ratio in (0, 1), or a list of layer indices"
    if isinstance(value, bool):
        return [f"run field 'softmax_layers' must {rule}; got {value!r}"]
    if isinstance(value, int) and value >= 1:
        return []
    if isinstance(value, float) and 0 < value < 1:
        return []
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return []
    return [f"run field 'softmax_layers' must {rule}; got {value!r}"]


def _number(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` when it is a number written as a string (``4e0``, ``2.5e-1``), else unchanged."""
    if not isinstance(value, str):
        return value
    ok, coerced = check_type(value, tp)
    return coerced if ok else value


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted = 'a.b'`` (creating mappings on the way).

    A numeric segment indexes a list: ``evaluators.1.limit`` is the second evaluator's ``limit``.
    """
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for p in parents:
        if isinstance(node, list):
            node = _list_item(node, p, dotted)
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: {p!r} is not a mapping or a list")
    if isinstance(node, list):
        node[_index(node, leaf, dotted)] = value
    else:
        node[leaf] = value


def _index(items: list[Any], segment: str, dotted: str) -> int:
    if not segment.isdigit() or int(segment) >= len(items):
        raise ConfigError(f"--set {dotted}: {segment!r} must be a list index from 0 to {len(items) - 1}")
    return int(segment)


def _list_item(items: list[Any], segment: str, dotted: str) -> Any:
    item = items[_index(items, segment, dotted)]
    if isinstance(item, str):  # a bare component name: turn it into a mapping to set its params
        item = items[int(segment)] = {"name": item}
    return item


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a config tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set must look like key.path=value; got {item!r}")
        key, raw = item.split("=", 1)
        set_path(tree, key.strip(), parse_yaml(raw, source=f"--set {item!r}: the value"))
    return tree


def _section(tree: Mapping[str, Any], key: str, cls: type, problems: list[str]) -> Any:
    try:
        return build_config(cls, tree.get(key) or {}, context=key)
    except ConfigError as exc:
        problems += exc.problems
        return None


def run_config_from_dict(tree: Mapping[str, Any], *, pm: Any = None) -> RunConfig:
    """Validate a config tree; all problems are reported together."""
    fields = [f.name for f in attrs.fields(RunConfig)]
    problems = []
    for key in tree:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append(f"run config has no field {key!r}.{hint} Known fields: {', '.join(fields)}")
    if "teacher" not in tree:
        problems.append("run field 'teacher' is required: a local directory or hub id")
    elif not isinstance(tree["teacher"], str):
        problems.append(f"run field 'teacher' must be a path or hub id; got {tree['teacher']!r}")
    if "data" not in tree:
        problems.append("run field 'data' is required, with at least data.train")
    data = _section(tree, "data", DataConfig, problems) if "data" in tree else None
    distill = _section(tree, "distill", DistillConfig, problems)
    selection = _section(tree, "selection", SelectionConfig, problems)
    if pm is None:  # one plugin manager for every check below
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    if selection is not None:
        _check_selection(selection, pm, problems)
    variant = _variant(tree.get("linear_attention", "gdn"), pm, problems)
    softmax = _number(tree.get("softmax_layers", 0.25), int | float)
    problems += _check_softmax_layers(softmax)
    ok, seed = check_type(tree.get("seed", 0), int)
    if not ok:
        problems.append(f"run field 'seed' must be int; got {seed!r}")
    evaluators = _evaluators(tree.get("evaluators"), pm, problems)
    device = device_problem(tree.get("device", "auto"))
    if device is not None:
        problems.append(device)
    if problems:
        raise ConfigError(problems)
    return RunConfig(teacher=tree["teacher"], data=data, linear_attention=variant, softmax_layers=softmax,
                     selection=selection, distill=distill, seed=seed, device=str(tree.get("device", "auto")), evaluators=evaluators)


def _evaluators(value: Any, pm: Any, problems: list[str]) -> list[ComponentRef]:
    """Every evaluator must exist and accept its params."""
    from hybridize.evaluate import parse_evaluators

    if pm is None:
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    refs, found = parse_evaluators(value, pm)
    problems += found
    return refs


def _check_selection(sel: SelectionConfig, pm: Any, problems: list[str]) -> None:
    """Every named selection component (and the probe variant) must exist and accept its params."""
    from hybridize.selection.contract import build_selector_configs

    if pm is None:
        from hybridize.registry.manager import get_plugin_manager

        pm = get_plugin_manager()
    for kind, ref in (("selector", sel.selector), ("scorer", sel.scorer), ("stop_criterion", sel.stop), ("linear_attention", sel.linear_attention)):
        if ref is None:
            continue
        try:
            entry = pm.registry(kind)[ref.name]
            if kind == "selector":  # its own params plus the distance options every selector takes
                build_selector_configs(entry, ref.params)
            else:
                entry.build_config(ref.params)
        except ConfigError as exc:
            where = "selection field 'linear_attention' (the probes' variant): " if kind == "linear_attention" else ""
            problems += [where + p for p in exc.problems]


def _variant(value: Any, pm: Any, problems: list[str]) -> ComponentRef | None:
    try:
        ref = ComponentRef.parse(value, where="run field 'linear_attention'")
        if pm is None:
            from hybridize.registry.manager import get_plugin_manager

            pm = get_plugin_manager()
        pm.registry("linear_attention")[ref.name].build_config(ref.params)
        return ref
    except ConfigError as exc:
        problems += exc.problems
        return None


def load_run_config(path: str | Path, overrides: Sequence[str] = (), *, pm: Any = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, validate.

    A ``compare`` section (what ``hybridize compare`` runs on the same file) is not part of a run and is
    left out, so one file serves both commands.
    """
    path = Path(path)
    tree = read_yaml_file(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    tree = {k: v for k, v in tree.items() if k != "compare"}
    return run_config_from_dict(apply_overrides(tree, overrides), pm=pm)
