"""The selector, scorer and stop criterion of one selection, built from the registry and checked against each other."""
from __future__ import annotations

from typing import Any, Literal

import attrs

from hybridize.errors import ConfigError
from hybridize.registry.configs import ComponentRef
from hybridize.selection.contract import ChoiceConfig, build_selector_configs


ge0, gt0 = attrs.validators.ge(0), attrs.validators.gt(0)


#: what a probe trains (``selection.probe_trainable``): every parameter as the paper's probes do, every
#: sequence mixer (the attention / linear-attention module of each layer), or only the mixer of the layer
#: the probe is about (``Probe.layer``); everything a probe does not train is shared with the teacher and
#: the shared stage 1 by reference (one tensor for every probe); see :func:`hybridize.selection.probes.trains`
PROBE_TRAINABLE = ("all", "mixers", "probed")


def _group_size(inst: Any, attribute: Any, value: Any) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    raise ValueError(f"'{attribute.name}' must be an int >= 0 or 'auto': {value!r}")


@attrs.frozen(kw_only=True)
class SelectionConfig:
    """How layers are selected.

    Args:
        selector: the selector and its params, e.g. ``{name: kl-greedy-add}``. Every selector also takes
            the distance options of :class:`~hybridize.selection.contract.ChoiceConfig` (``min_gap``,
            ``gap_penalty``, ``gap_radius``), e.g. ``{name: kl-greedy-add, min_gap: 2}``.
        scorer: the scorer (None = the selector's default: kl for probes, mse for stage 1).
        linear_attention: the linear-attention variant of the probes and of the shared stage 1 that
            scores layers, e.g. ``{name: gdn}`` (None = the run's ``linear_attention``, the final
            hybrid's variant). When it differs from the final variant, the final hybrid runs its own
            stage 1 instead of reusing the selection's.
        stop: the stop criterion, e.g. ``{name: rolling-jaccard, windows: 10, threshold: 0.9}``.
        probe_tokens: stage-2 tokens per probe (upper bound; the stop criterion may end earlier).
        eval_every: probe steps per evaluation window (0 = about 20 windows).
        probe_lr_attn / probe_lr_other: probe learning rates (0 = distill.stage2_lr_attn / _other).
        probe_group_size: probes trained together on the device: ``auto`` (the largest group that fits in
            90% of the GPU, all of them on CPU; resolved by the recipe from :mod:`hybridize.recipes.plan`),
            an int >= 1, or 0 = all at once.
        probe_trainable: what a probe trains and owns (:data:`PROBE_TRAINABLE`): ``all`` (every parameter,
            as the paper's probes), ``mixers`` (every layer's attention / linear attention) or ``probed``
            (only the mixer of the layer the probe scores). The rest is shared with the teacher and the
            shared stage 1 by reference, so a probe's memory, optimizer state and checkpoint are what it trains.
        probe_offload: where the probes wait while another group trains: ``host`` (pinned host memory),
            ``disk`` (a scratch file per probe under the checkpoint directory, read back at its turn) or
            ``auto`` (host when the plan finds room for them there, else disk; resolved by the recipe).
        probe_checkpoints: where each evaluation window's checkpoint of every probe goes: ``disk`` (under the run's
            checkpoints: a killed selection resumes from its last window) or ``memory`` (the last window only, as the
            state a diverged probe restarts from: no disk writes per window, and ``--resume`` restarts a killed
            selection from its first window; for short selections whose per-window writes would cost more than
            redoing them).
        nan_retry_lr_scale: a probe whose loss or score turns NaN / inf is retried once from its last
            checkpoint with its learning rates times this factor; if it diverges again it is marked
            failed and left out of the ranking.
    """

    selector: ComponentRef = attrs.field(default=ComponentRef(name="kl-greedy-add"), converter=lambda v: ComponentRef.parse(v, where="selection field 'selector'"))
    scorer: ComponentRef | None = attrs.field(default=None, converter=lambda v: None if v is None else ComponentRef.parse(v, where="selection field 'scorer'"))
    stop: ComponentRef = attrs.field(default=ComponentRef(name="rolling-jaccard"), converter=lambda v: ComponentRef.parse(v, where="selection field 'stop'"))
    linear_attention: ComponentRef | None = attrs.field(default=None, converter=lambda v: None if v is None else ComponentRef.parse(v, where="selection field 'linear_attention'"))
    probe_tokens: int = attrs.field(default=200_000, validator=gt0)
    eval_every: int = attrs.field(default=0, validator=ge0)
    probe_lr_attn: float = attrs.field(default=0.0, validator=ge0)
    probe_lr_other: float = attrs.field(default=0.0, validator=ge0)
    probe_group_size: int | Literal["auto"] = attrs.field(default="auto", validator=_group_size)
    probe_trainable: str = attrs.field(default="mixers", validator=attrs.validators.in_(PROBE_TRAINABLE))
    probe_offload: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "host", "disk")))
    probe_checkpoints: str = attrs.field(default="disk", validator=attrs.validators.in_(("disk", "memory")))
    nan_retry_lr_scale: float = attrs.field(default=0.1, validator=[gt0, attrs.validators.lt(1.0)])


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
