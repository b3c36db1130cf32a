"""The selector, scorer and stop criterion of one selection, built from the registry and checked against each other."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from hybridize.errors import ConfigError
from hybridize.registry.configs import ComponentRef
from hybridize.selection.contract import ChoiceConfig, build_selector_configs

if TYPE_CHECKING:
    from hybridize.selection.engine import SelectionConfig


@attrs.define
class Components:
    """The selector, scorer, stop criterion and distance options of one selection, built from the registry."""

    selector: Any
    scorer: Any
    stop: Any
    names: dict[str, Any]
    choice: ChoiceConfig = ChoiceConfig()

    @classmethod
    def build(cls, cfg: SelectionConfig, pm: Any, *, seed: int, k: int) -> Components:
        sel_entry = pm.registry("selector")[cfg.selector.name]
        sel_config, choice = build_selector_configs(sel_entry, cfg.selector.params)
        selector = sel_entry.factory(sel_config, seed=seed)
        scorer_ref = cfg.scorer or (ComponentRef(name=selector.default_scorer) if selector.default_scorer else None)
        scorer = None
        if scorer_ref is not None and selector.needs != "none":
            entry = pm.registry("scorer")[scorer_ref.name]
            scorer = entry.factory(entry.build_config(scorer_ref.params))
            want = {"probes": "probe", "stage1": "stage1", "teacher": "teacher"}[selector.needs]
            if scorer.requires != want:
                raise ConfigError(
                    f"selection field 'scorer' must be a scorer of {want} results for selector {cfg.selector.name!r}; "
                    f"got {scorer_ref.name!r}, which scores {scorer.requires} results"
                )
        stop_entry = pm.registry("stop_criterion")[cfg.stop.name]
        stop = stop_entry.factory(stop_entry.build_config(cfg.stop.params), k=k)
        names = {"selector": cfg.selector.name, "scorer": scorer_ref.name if scorer else None, "stop": cfg.stop.name}
        if choice.active:
            names["choice"] = choice.to_dict()
        return cls(selector, scorer, stop, names, choice)
