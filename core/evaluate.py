"""Evaluation: run registered evaluators on an in-memory or saved model; tables of their metrics.

An evaluator is built as ``entry.factory(config)`` and called with an :class:`EvalTarget`; it returns
an :class:`EvalResult`: ``metrics`` (name -> float, merged into result.json ``metrics``: one entry per
task) and ``details`` (versions, sample counts, per-length scores, ...).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from hybridize.registry.configs import ComponentRef
from hybridize.errors import ConfigError, HybridizeError

if TYPE_CHECKING:
    import torch
    from torch import nn


@attrs.define(kw_only=True)
class EvalTarget:
    """What an evaluator evaluates.

    Args:
        model: the causal LM (a hybrid or a plain teacher), in eval mode.
        tokenizer: its tokenizer object.
        label: a name for tables (the directory, or ``hybrid``).
        path: the saved directory when there is one.
        teacher: the teacher model, when known (heldout-kl needs one).
        heldout: held-out token blocks ``(N, T)`` of the run, when known.
        progress: show progress bars.
    """

    model: nn.Module
    tokenizer: Any
    label: str = "model"
    path: str | None = None
    teacher: nn.Module | None = None
    heldout: torch.Tensor | None = None
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@attrs.frozen(kw_only=True)
class EvalResult:
    """What an evaluator returns: flat float ``metrics`` and JSON-friendly ``details``."""

    metrics: dict[str, float]
    details: dict[str, Any] = attrs.field(factory=dict)


class Evaluator(Protocol):
    """A built evaluator: ``evaluator(target) -> EvalResult``. Runs under ``torch.no_grad``.

    An evaluator may also have ``check(tokenizer) -> list[str]``: the problems of its settings that need
    no model (task names, lengths against the tokenizer, data files). A run calls it before it writes
    anything (:func:`check_evaluators`), so a mistake there does not cost the whole distillation.
    """

    def __call__(self, target: EvalTarget) -> EvalResult: ...


def parse_evaluators(value: Any, pm: Any, *, where: str = "run field 'evaluators'") -> tuple[list[ComponentRef], list[str]]:
    """Parse and validate a list of evaluator refs; returns (refs, problems)."""
    if value is None:
        return [], []
    if not isinstance(value, (list, tuple)):
        return [], [f"{where} must be a list like [{{name: heldout-kl}}, {{name: lm-eval, tasks: [niah_single_1]}}]; got {value!r}"]
    refs, problems = [], []
    for i, item in enumerate(value):
        try:
            ref = ComponentRef.parse(item, where=f"{where}[{i}]")
            pm.registry("evaluator")[ref.name].build_config(ref.params)
            refs.append(ref)
        except ConfigError as exc:
            problems += exc.problems
    return refs, problems


def merge_metrics(own: dict[str, Any], evals: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A run's own metrics plus each evaluator's, one name one meaning.

    An evaluator metric whose name the run already uses for its own measurement (``heldout_kl``,
    ``student_ppl``, ``teacher_ppl``: the ``heldout-kl`` evaluator measures them on its own blocks)
    is recorded as ``<evaluator>/<metric>`` instead of replacing the run's value; every other
    evaluator metric (an lm-eval task, ``perplexity``) keeps its plain name.

    Args:
        own: the run's metrics (never modified).
        evals: :func:`run_evaluators`' ``evals`` list.
    """
    merged = dict(own)
    for ev in evals:
        for key, value in ev["metrics"].items():
            merged[f"{ev['name']}/{key}" if key in own else key] = value
    return merged


def check_evaluators(refs: Sequence[ComponentRef], pm: Any, tokenizer: Any) -> list[str]:
    """The problems every evaluator's optional ``check(tokenizer)`` finds in its static settings."""
    problems: list[str] = []
    for ref in refs:
        entry = pm.registry("evaluator")[ref.name]
        check = getattr(entry.factory(entry.build_config(ref.params)), "check", None)
        if check is None:
            continue
        try:
            problems += list(check(tokenizer) or [])
        except ConfigError as exc:
            problems += exc.problems
    return problems


def run_evaluators(refs: Sequence[ComponentRef], target: EvalTarget, pm: Any) -> dict[str, Any]:
    """Build and run each evaluator; returns ``{"metrics": {...}, "evals": [{name, metrics, details, seconds}]}``."""
    import torch

    metrics: dict[str, float] = {}
    evals = []
    for ref in refs:
        entry = pm.registry("evaluator")[ref.name]
        evaluator = entry.factory(entry.build_config(ref.params))
        t0 = time.perf_counter()
        was_training = target.model.training
        target.model.eval()
        with torch.no_grad():
            out = evaluator(target)
        target.model.train(was_training)
        if not isinstance(out, EvalResult):
            raise HybridizeError(f"evaluator {ref.name!r} ({entry.origin.describe()}) returned {out!r}; expected an EvalResult")
        metrics.update(out.metrics)
        evals.append({"name": ref.name, "params": dict(ref.params), "metrics": out.metrics, "details": out.details,
                      "seconds": round(time.perf_counter() - t0, 1)})
    return {"metrics": metrics, "evals": evals}


def load_for_eval(path: str | Path, *, device: str = "cpu", pm: Any = None) -> EvalTarget:
    """Load a saved hybrid (its variant from ``pm``'s registry, default a new manager) or a plain Hugging Face
    causal-LM directory, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hybridize.model.hybrid import PREFIX, load_hybrid

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"hybridize eval: {str(path)!r} must be a model directory with a config.json "
                          f"(a saved hybrid such as OUT/model, or a Hugging Face teacher)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"hybridize eval: {str(path)!r} has no loadable tokenizer ({exc}); save one beside the weights") from exc
    config = AutoConfig.from_pretrained(path)
    if str(config.model_type).startswith(PREFIX):
        model = load_hybrid(path, device=device, pm=pm)
    else:
        from hybridize.model.teacher import check_finite_weights
        from hybridize.model.weights import check_weights_match_config

        what = f"hybridize eval: model directory {str(path)!r}"
        check_weights_match_config(path, config, what)  # safetensors only, complete, matching config.json
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        check_finite_weights(model, what)
        model = model.to(device)
    return EvalTarget(model=model.eval(), tokenizer=tokenizer, label=path.name if path.name != "model" else path.parent.name, path=str(path))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per metric, one column per model: ``results`` maps a label to a :func:`run_evaluators` output."""
    labels = list(results)
    keys: list[str] = []
    for r in results.values():
        keys += [k for k in r["metrics"] if k not in keys]
    samples: dict[str, str] = {}
    for r in results.values():
        for ev in r["evals"]:
            for task, info in (ev["details"].get("tasks") or {}).items():
                samples.setdefault(task, _fmt(info.get("samples")))
    lines = ["| metric | " + " | ".join(labels) + " | samples |", "|---|" + "---|" * len(labels) + "---|"]
    for k in keys:
        row = [_fmt(results[lab]["metrics"].get(k)) for lab in labels]
        lines.append(f"| {k} | " + " | ".join(row) + f" | {samples.get(k.split('@')[0], '')} |")
    return "\n".join(lines)
