"""``lm-eval``: any lm-evaluation-harness task on an in-memory or saved model, RULER and SWDE offline.

The model and its tokenizer object are wrapped in lm-eval's ``HFLM`` (backend ``causal``) and each
task runs through ``simple_evaluate`` with a ``TaskManager``. Network access is off unless
``online: true``: the Hugging Face offline switches are set before lm-eval and datasets are imported.
"""
from __future__ import annotations

import difflib
import functools
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from hybridize import hookimpl
from hybridize.errors import ConfigError, HybridizeError
from hybridize.evaluate import EvalResult, EvalTarget
from hybridize.plugins.evals import ruler, swde
from hybridize.plugins.evals.network import is_offline_error, network

_NON_METRIC = {"alias", "name", "sample_len", " "}


def _non_empty(inst: Any, attribute: attrs.Attribute, value: list) -> None:
    if not value or not all(isinstance(t, str) and t for t in value):
        raise ConfigError(f"field '{attribute.name}' must be a non-empty list of lm-eval task names; got {value!r}")


def _optional_ge1(inst: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"field '{attribute.name}' must be >= 1 or null; got {value!r}")


@attrs.frozen(kw_only=True)
class LmEvalConfig:
    """Options of the ``lm-eval`` evaluator.

    Args:
        tasks: lm-eval task or group names (``niah_single_1``, ``ruler``, ``swde``, ``hellaswag``, ...).
        max_seq_lengths: RULER lengths in tokens (prompt plus generated tokens), one score per length.
        limit: documents per task (RULER: generated per length); None = all (RULER: lm-eval's 500).
        batch_size: HFLM batch size.
        max_length: HFLM context length; None = the largest RULER length, else the model's.
        online: allow the Hugging Face hub (hub data sets, RULER QA, the hub essay haystack).
        essays_dir: directory of ``*.txt`` essays for RULER's essay haystacks (niah_single_2/3,
            niah_multikey_1, niah_multivalue, niah_multiquery) instead of the hub copy.
        swde_data: local SWDE ``.parquet`` / ``.jsonl`` (columns doc_id, file_name, key, value, text).
        num_fewshot: few-shot examples (None = each task's default).
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors (0 = none).
        seed: lm-eval's random seed (RULER documents depend on it).
        include_path: directories of your own lm-eval task YAML files (as ``lm_eval --include_path``);
            their tasks are found by name like the built-in ones.
    """

    tasks: list[str] = attrs.field(validator=_non_empty)
    max_seq_lengths: list[int] = attrs.field(factory=lambda: [4096])
    limit: int | None = attrs.field(default=None, validator=_optional_ge1)
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    max_length: int | None = attrs.field(default=None, validator=_optional_ge1)
    online: bool = False
    essays_dir: str | None = None
    swde_data: str | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    seed: int = 0
    include_path: list[str] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        tasks = ruler.expand(self.tasks)
        problems = ruler.config_problems(tasks, online=self.online, essays_dir=self.essays_dir, lengths=self.max_seq_lengths)
        problems += swde.check_source(self.swde_data)
        problems += [f"field 'include_path': {p!r} is not a directory of lm-eval task YAML files; fix the path"
                     for p in self.include_path if not Path(p).expanduser().is_dir()]
        if self.swde_data is not None and "swde" not in tasks:
            problems.append(f"field 'swde_data' is set but 'swde' is not among tasks {self.tasks}; add it or drop swde_data")
        if problems:
            raise ConfigError(problems)


def _task_manager(tasks: list[str], include_path: list[str] = ()) -> Any:
    """lm-eval's TaskManager; indexing only RULER, SWDE and the user's include paths (fast) when nothing else is asked for."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    extra = [str(Path(p).expanduser()) for p in include_path]
    if extra:
        own = TaskManager(include_defaults=False, include_path=extra)
        if all(t in own.all_tasks for t in tasks):
            return own
    if all(ruler.is_ruler(t) or t == "swde" for t in tasks):
        root = Path(lm_eval.__file__).parent / "tasks"
        return TaskManager(include_defaults=False, include_path=[str(root / "ruler"), str(root / "swde"), *extra])
    return TaskManager(include_path=extra or None)


def _check_known(tm: Any, tasks: list[str]) -> None:
    known = set(tm.all_tasks)
    problems = []
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            problems.append(f"evaluator 'lm-eval' field 'tasks': unknown lm-eval task {t!r}.{hint} "
                            f"`python -m lm_eval ls tasks` lists them")
    if problems:
        raise ConfigError(problems)


def _row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """``{"512,none": 0.4, "512_stderr,none": ...}`` -> ``{"512": 0.4}`` (RULER's -1 = no sample at that length)."""
    out = {}
    for key, v in row.items():
        if key in _NON_METRIC or "_stderr" in key or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        name, _, flt = key.partition(",")
        out[name if flt in ("", "none") else key] = float(v)
    return out


class LmEval:
    """The ``lm-eval`` evaluator (see :class:`LmEvalConfig`)."""

    def __init__(self, config: LmEvalConfig):
        self.config = config
        self.tasks = ruler.expand(config.tasks)

    def check(self, tokenizer: Any) -> list[str]:
        """Static settings: every task name exists (did-you-mean), RULER lengths fit this tokenizer."""
        problems: list[str] = []
        with network(self.config.online):
            quiet = logging.getLogger("lm_eval")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                tm = _task_manager(self.tasks, self.config.include_path)
                for check in (lambda: _check_known(tm, self.tasks),
                              lambda: ruler.check_lengths(self.tasks, tokenizer, self.config.max_seq_lengths)):
                    try:
                        check()
                    except ConfigError as exc:
                        problems += exc.problems
            finally:
                quiet.setLevel(level)
        return problems

    def __call__(self, target: EvalTarget) -> EvalResult:
        cfg = self.config
        with network(cfg.online), tempfile.TemporaryDirectory(prefix="hybridize-tok-") as tmp:
            import lm_eval

            quiet = logging.getLogger("lm_eval")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                tm = _task_manager(self.tasks, self.config.include_path)
                _check_known(tm, self.tasks)
                ruler.check_lengths(self.tasks, target.tokenizer, cfg.max_seq_lengths)
                splitter = ruler.sentence_splitter() if set(self.tasks) & set(ruler.ESSAY) else None
                lm = self._hflm(target)
                saved: list[str] = []

                def tokenizer_path() -> str:  # RULER's QA loader wants a path: save the in-memory tokenizer once
                    if not saved:
                        target.tokenizer.save_pretrained(tmp)
                        saved.append(tmp)
                    return saved[0]

                tasks = {t: self._run_task(lm, tm, t, target, tokenizer_path) for t in self.tasks}
            finally:
                quiet.setLevel(level)
        metrics: dict[str, float] = {}
        for t, info in tasks.items():
            metrics.update(info.pop("_metrics"))
        details = {"lm_eval_version": lm_eval.__version__, "limit": cfg.limit, "batch_size": cfg.batch_size,
                   "max_seq_lengths": list(cfg.max_seq_lengths), "online": cfg.online, "tasks": tasks}
        if splitter:
            details["essay_sentence_splitter"] = splitter
        return EvalResult(metrics=metrics, details=details)

    def _hflm(self, target: EvalTarget) -> Any:
        from lm_eval.models.huggingface import HFLM

        max_length = self.config.max_length
        if max_length is None and any(t in ruler.SUBTASKS for t in self.tasks):
            max_length = max(self.config.max_seq_lengths)
        lm = HFLM(pretrained=target.model, tokenizer=target.tokenizer, backend="causal", batch_size=self.config.batch_size,
                  max_length=max_length, device=str(target.device))
        if not target.progress:  # HFLM's request bars take an explicit switch
            for name in ("generate_until", "loglikelihood", "loglikelihood_rolling"):
                setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
        return lm

    def _spec(self, tm: Any, task: str, target: EvalTarget, tokenizer_path: Callable[[], str]) -> tuple[Any, int | None, str]:
        """(task spec for lm-eval, limit to pass, where the documents come from)."""
        cfg = self.config
        if task in ruler.SUBTASKS:
            n = cfg.limit or 500
            spec = ruler.task_config(tm, task, tokenizer=target.tokenizer, lengths=cfg.max_seq_lengths, n=n,
                                     essays_dir=cfg.essays_dir, tokenizer_path=tokenizer_path)
            if task in ruler.QA:
                return spec, cfg.limit, "hub (lm-eval's loader)"
            source = "synthetic" if task not in ruler.ESSAY else (f"essays in {cfg.essays_dir}" if cfg.essays_dir else "hub essays")
            return spec, None, f"{source}, {n} per length"
        if task == "swde" and cfg.swde_data is not None:
            return swde.local_task_spec(cfg.swde_data), cfg.limit, str(cfg.swde_data)
        return task, cfg.limit, "lm-eval task data"

    def _run_task(self, lm: Any, tm: Any, task: str, target: EvalTarget, tokenizer_path: Callable[[], str]) -> dict[str, Any]:
        from lm_eval import simple_evaluate

        spec, limit, source = self._spec(tm, task, target, tokenizer_path)
        if target.progress:
            print(f"[lm-eval] {target.label}: {task} ({source})", file=sys.stderr, flush=True)
        try:
            res = simple_evaluate(lm, tasks=[spec], task_manager=tm, limit=limit, num_fewshot=self.config.num_fewshot,
                                  bootstrap_iters=self.config.bootstrap_iters, log_samples=False, random_seed=self.config.seed)
        except HybridizeError:
            raise
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise anything; name the task and the fix
            raise self._task_error(task, exc) from exc
        return self._collect(task, res, source)

    def _task_error(self, task: str, exc: Exception) -> HybridizeError:
        if not self.config.online and is_offline_error(exc):
            local = " or a local file with swde_data (--swde-data)" if task == "swde" else ""
            return HybridizeError(f"lm-eval task {task!r} needs data from the Hugging Face hub and the network is off by default: "
                                  f"opt in with online: true (--online){local}. Cause: {type(exc).__name__}: {exc}")
        return HybridizeError(f"lm-eval task {task!r} failed: {type(exc).__name__}: {exc}")

    def _collect(self, task: str, res: dict[str, Any], source: str) -> dict[str, Any]:
        rows = {name: _row_metrics(row) for name, row in res["results"].items()}
        own = rows.get(task) or next(iter(rows.values()), {})
        n = res.get("n-samples", {}).get(task) or {}
        metrics: dict[str, float] = {}
        if task in ruler.SUBTASKS:
            per_len = {k: v for k, v in own.items() if k.isdigit() and int(k) in self.config.max_seq_lengths and v != -1}
            if per_len:
                metrics[task] = sum(per_len.values()) / len(per_len)
            if len(self.config.max_seq_lengths) > 1:
                metrics.update({f"{task}@{k}": v for k, v in per_len.items()})
            own = per_len
        elif own:
            metrics[task] = next(iter(own.values()))
        return {"metrics": own, "primary": next(iter(own), None) if task not in ruler.SUBTASKS else "mean over lengths",
                "subtasks": {k: v for k, v in rows.items() if k != task}, "samples": n.get("effective"),
                "documents": n.get("original"), "version": res.get("versions", {}).get(task), "data": source,
                "_metrics": metrics}


def lm_eval_evaluator(config: LmEvalConfig) -> LmEval:
    """Factory of ``lm-eval``."""
    return LmEval(config)


@hookimpl
def hybridize_register_evaluators(register) -> None:
    """Register ``lm-eval``."""
    register("lm-eval", lm_eval_evaluator, LmEvalConfig, capabilities=frozenset({"lm-eval", "generation"}))
