"""Preflight: every check of a run's inputs that can be made before anything is written.

``distill``, ``run`` and ``compare`` call :func:`check_run` before they create ``OUT``, so a mistake
found here leaves nothing on disk, and the corrected command simply runs again. It checks, without
loading the teacher's weights:

- the teacher: ``config.json`` (present, readable, a supported architecture), the tokenizer (present,
  loadable, within the vocabulary), the weights (safetensors only, complete, matching the config's
  tensor names and shapes: :mod:`hybridize.model.weights`);
- the softmax layers against the teacher's layer count: K or ratio, explicit lists, ``min_gap`` of
  every selector at every budget;
- the data: every file readable, not empty, holding text, at least one block of ``data.seq_len``
  (which must fit the teacher's ``max_position_embeddings`` unless ``data.allow_longer_than_teacher``);
- every evaluator's static settings (lm-eval task names, RULER lengths against the tokenizer).

Problems of the config are collected into one :class:`~hybridize.errors.ConfigError`; a teacher that
cannot be read stops at once (nothing else can be checked without it). The packed data is returned
so the caller does not prepare it twice.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from hybridize.errors import ConfigError, HybridizeError

COMMANDS = ("run", "distill", "compare")


@attrs.frozen
class Checked:
    """What the preflight found: the teacher's files, the packed data (of ``seed``), K per budget."""

    teacher: Any  # hybridize.model.teacher.TeacherFiles
    data: Any  # hybridize.training.data.PackedData
    seed: int
    ks: dict[Any, int]

    def k(self, budget: Any) -> int:
        """K of one budget (an int K, a ratio or an explicit list)."""
        return self.ks[_key(budget)]


def check_run(cfg: Any, pm: Any, *, command: str, budgets: Sequence[Any] | None = None, selectors: Sequence[Any] | None = None,
              seed: int | None = None) -> Checked:
    """Check every input of ``hybridize <command>``; nothing is written.

    Args:
        cfg: the run config (for ``compare``, its base run config).
        pm: the command's plugin manager.
        command: ``run``, ``distill`` or ``compare``.
        budgets: ``compare``'s budgets (default: ``cfg.softmax_layers``).
        selectors: ``compare``'s selectors (default: ``cfg.selection.selector``).
        seed: the seed whose data split is returned (default: ``cfg.seed``).

    Raises:
        ConfigError: every problem of the layers, data, sequence length and evaluators together.
        HybridizeError: the teacher cannot be used (naming the file and the fix).
    """
    from hybridize.training.data import DataError, prepare_data
    from hybridize.evaluate import check_evaluators
    from hybridize.model.teacher import inspect_teacher

    if command not in COMMANDS:
        raise ValueError(f"check_run field 'command' must be one of {COMMANDS}; got {command!r}")
    if command == "distill" and not isinstance(cfg.softmax_layers, list):
        raise ConfigError(
            f"hybridize distill field 'softmax_layers' must be an explicit list of layer indices; got "
            f"{cfg.softmax_layers!r} (use `hybridize run` to select layers)"
        )
    teacher = inspect_teacher(cfg.teacher)
    if teacher.tokenizer is None:
        raise HybridizeError(f"teacher {teacher.path!r} has no tokenizer (no tokenizer.json, tokenizer_config.json, tokenizer.model "
                             "or vocab.json); put the tokenizer files saved with this checkpoint in that directory")
    problems: list[str] = []
    ks = _budgets(cfg, pm, command, teacher.n_layers, budgets, selectors, problems)
    problems += seq_len_problems(cfg.data, teacher.config)
    problems += check_evaluators(cfg.evaluators, pm, teacher.tokenizer)
    seed = cfg.seed if seed is None else seed
    data = None
    try:
        data = prepare_data(cfg.data, teacher.tokenizer, seed=seed)
    except DataError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return Checked(teacher=teacher, data=data, seed=seed, ks=ks)


def _budgets(cfg: Any, pm: Any, command: str, n_layers: int, budgets: Sequence[Any] | None, selectors: Sequence[Any] | None,
             problems: list[str]) -> dict[Any, int]:
    """K of every budget; explicit layer lists and every selector's ``min_gap`` checked against ``n_layers``."""
    from hybridize.selection.contract import build_selector_configs, resolve_budget
    from hybridize.model.surgery import check_softmax_layers

    if command == "distill":
        return _distill_layers(cfg.softmax_layers, n_layers, problems)
    ks: dict[Any, int] = {}
    for budget in budgets or [cfg.softmax_layers]:
        try:
            if isinstance(budget, list):
                check_softmax_layers(budget, n_layers, field="run field 'softmax_layers'")
            ks[_key(budget)] = resolve_budget(budget, n_layers)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    for ref in selectors or ([] if isinstance(cfg.softmax_layers, list) else [cfg.selection.selector]):
        _, choice = build_selector_configs(pm.registry("selector")[ref.name], ref.params)
        for k in sorted(set(ks.values())):
            try:
                choice.check(n_layers, k, ref.name)
            except ConfigError as exc:
                problems += exc.problems
                break
    return ks


def _key(budget: Any) -> Any:
    return tuple(budget) if isinstance(budget, list) else budget


def _distill_layers(layers: list[int], n_layers: int, problems: list[str]) -> dict[Any, int]:
    from hybridize.model.surgery import check_softmax_layers

    field = "hybridize distill field 'softmax_layers'"
    try:
        check_softmax_layers(layers, n_layers, field=field)
    except ConfigError as exc:
        problems += exc.problems
        return {}
    if len(layers) == n_layers:
        problems.append(f"{field} must leave at least one of the teacher's {n_layers} layers linear; got {sorted(layers)} "
                        "(every layer, i.e. the teacher itself). Drop a layer from the list")
    return {_key(layers): len(layers)}


def seq_len_problems(data: Any, teacher_config: Any) -> list[str]:
    """``data.seq_len`` must fit the teacher's positions unless ``data.allow_longer_than_teacher`` opts in."""
    limit = getattr(teacher_config, "max_position_embeddings", None)
    if limit is None or data.seq_len <= limit or data.allow_longer_than_teacher:
        return []
    return [f"data field 'seq_len' must be <= the teacher's max_position_embeddings ({limit}); got {data.seq_len}. Lower "
            "data.seq_len, or set data.allow_longer_than_teacher: true for a teacher that extrapolates (e.g. rope scaling)"]
