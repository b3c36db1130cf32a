"""Hook specifications of the ``hybridize`` pluggy project. Nothing but hookspecs lives here."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from hybridize.registry.entries import RegisterCallback

hookspec = pluggy.HookspecMarker("hybridize")


@hookspec
def hybridize_register_linear_attention(register: RegisterCallback) -> None:
    """Register linear-attention variants (GDN, GLA, ...).

    The factory is an ``nn.Module`` class following :class:`hybridize.LinearAttention`:
    ``factory(spec, config)`` builds the module for one teacher layer, and its
    ``load_teacher_weights`` method transfers that layer's q/k/v/o weights.

    :param register: call ``register(name, factory, config_cls, capabilities=...)`` once per variant.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_register_selectors(register: RegisterCallback) -> None:
    """Register layer selectors (kl-greedy-add, uniform, ...).

    :param register: call ``register(name, factory, config_cls, capabilities=...)`` once per selector.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_register_scorers(register: RegisterCallback) -> None:
    """Register layer scorers (kl, mse, ...) that selectors use to rate probes.

    :param register: call ``register(name, factory, config_cls, capabilities=...)`` once per scorer.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_register_stop_criteria(register: RegisterCallback) -> None:
    """Register stop criteria (fixed-budget, rolling-jaccard, ...) for a selection.

    :param register: call ``register(name, factory, config_cls, capabilities=...)`` once per criterion.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_register_evaluators(register: RegisterCallback) -> None:
    """Register evaluators (lm-eval tasks, heldout-kl, perplexity, ...).

    :param register: call ``register(name, factory, config_cls, capabilities=...)`` once per evaluator.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_register_exporters(register: RegisterCallback) -> None:
    """Register export formats (qwen3_5, ...): layouts of stock inference engines that ``hybridize export`` writes.

    The factory builds an :class:`hybridize.export.Exporter` from its config: ``factory(config)``; the name is
    the ``--format`` of ``hybridize export``.

    :param register: call ``register(name, factory, config_cls, capabilities=...)`` once per format.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_run_start(run_dir: str | None, config: Any) -> None:
    """Observe the start of a run, before the teacher is loaded.

    :param run_dir: the output directory, or None for an in-memory run.
    :param config: the resolved run configuration.
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_step_end(stage: str, step: int, tokens: int, metrics: dict[str, float]) -> None:
    """Observe the end of one optimisation step (stage 1, stage 2, stage 3) or of a probe's evaluation window.

    :param stage: ``"stage1"``, ``"stage2"``, ``"stage3"``, or ``"probe:<layer>"`` once per probe at the end of
        every selection window (the probes train in lockstep, so a window is their natural step).
    :param step: the optimizer step just finished, from 1 (for a probe: its probe steps so far).
    :param tokens: tokens consumed by this stage so far (for a probe: its tokens so far).
    :param metrics: scalar metrics of the step (loss, lr, ...; for a probe: ``score``, its raw held-out
        score, and ``importance``, higher = keep softmax).
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_selection_done(softmax_layers: list[int], scores: dict[int, float]) -> None:
    """Observe the result of a layer selection.

    :param softmax_layers: the layers that stay softmax attention, sorted.
    :param scores: layer index -> importance (higher = keep softmax).
    :returns: None.

    .. versionadded:: 0.1
    """


@hookspec
def hybridize_run_end(run_dir: str | None, result: dict[str, Any]) -> None:
    """Observe the end of a run, after result.json is written.

    :param run_dir: the output directory, or None for an in-memory run.
    :param result: the content of result.json.
    :returns: None.

    .. versionadded:: 0.1
    """
