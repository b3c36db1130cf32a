"""The ``hybridize`` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hybridize.errors import HybridizeError, RemoteError


def cmd_plugins(args: argparse.Namespace) -> int:
    """List plugins, their versions and hooks, and every registered component by kind."""
    from hybridize.recipes.plugin_list import plugins_payload, print_plugins
    from hybridize.registry.manager import get_plugin_manager

    pm = get_plugin_manager(skip_broken=args.skip_broken_plugins, collect_broken=True)
    payload = plugins_payload(pm)  # builds every registry: a hook that raises is recorded in pm.broken too
    payload["broken_plugins"] = [str(e) for e in pm.broken]
    if args.json:
        json.dump(payload, sys.stdout, indent=2, default=str)
        print()
    else:
        print_plugins(payload)
    level = "warning" if args.skip_broken_plugins else "error"
    for err in pm.broken:  # the others are listed above: one broken plugin does not hide them
        print(f"hybridize: {level}: {err}", file=sys.stderr)
    return 2 if pm.broken and not args.skip_broken_plugins else 0


def _command_pm(args: argparse.Namespace) -> Any:
    """The one plugin manager of a command (entry points loaded once): config validation, preflight, selection,
    surgery and evaluation all use it."""
    from hybridize.registry.manager import get_plugin_manager

    return get_plugin_manager(skip_broken=args.skip_broken_plugins)


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a hybrid with explicit softmax layers: stage 1 -> 2 (-> 3), save OUT/model and OUT/result.json."""
    from hybridize.recipes.run import distill
    from hybridize.recipes.runconfig import load_run_config

    pm = _command_pm(args)
    cfg = load_run_config(args.config, args.set, pm=pm)
    if args.nproc is not None and args.nproc != 1:
        return _relaunch(args, cfg)
    result = distill(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, pm=pm)
    if result is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    m = result["metrics"]
    print(f"\nsoftmax layers {result['softmax_layers']}, {result['linear_attention']} elsewhere")
    for key in ("heldout_kl_after_surgery", "heldout_kl_after_stage1", "heldout_kl_after_stage2", "heldout_kl", "student_ppl", "teacher_ppl"):
        if key in m:
            print(f"  {key:<28} {m[key]:.4f}")
    print(f"  tokens: {result['tokens']}")
    print(f"wrote {args.out}/result.json, {args.out}/distill.png and the hybrid in {args.out}/model ({result['wall_seconds']} s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Select softmax layers, distil the chosen hybrid, save OUT/model, OUT/result.json and the plots."""
    from hybridize.recipes.run import run
    from hybridize.recipes.runconfig import load_run_config

    pm = _command_pm(args)
    cfg = load_run_config(args.config, args.set, pm=pm)
    if args.dry_run:
        return _dry_run(args, cfg, pm)
    if args.nproc is not None and args.nproc != 1:
        return _relaunch(args, cfg)
    result = run(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, pm=pm)
    if result is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    t, m = result["tokens"], result["metrics"]
    print(f"\nselected softmax layers {result['softmax_layers']} (K={result['k']}) by {result['selection']['components']['selector']}")
    print("  importance: " + ", ".join(f"{l}: {v:.4g}" for l, v in sorted(result["scores"].items(), key=lambda kv: int(kv[0]))))
    if result["selection"].get("failed_layers"):
        print(f"  probes that diverged twice (NaN / inf), left out of the ranking: layers {result['selection']['failed_layers']}")
    if t["n_probes"]:
        print(f"  {t['n_probes']} probes x {t['probe_each']:,} tokens; stop step {result['stop_step']}; selection cost "
              f"{t['selection_cost']:,} tokens = {t['selection_cost_ratio']:.3f}x the independent per-probe pipeline ({t['independent_pipeline_equivalent']:,})")
    if "distributed" in result:
        d = result["distributed"]
        per_rank = f"probes per rank {d['probes_per_rank']}; " if "probes_per_rank" in d else ""
        print(f"  {d['world_size']} processes ({d['backend']}): {per_rank}final distillation {d['final_distillation']}")
    for key in ("heldout_kl", "student_ppl", "teacher_ppl"):
        print(f"  {key:<12} {m[key]:.4f}")
    print(f"wrote {args.out}/result.json, scores.png, jaccard.png, distill.png and the hybrid in {args.out}/model ({result['wall_seconds']} s)")
    return 0


def _dry_run(args: argparse.Namespace, cfg: Any, pm: Any) -> int:
    """``hybridize run --dry-run``: print the memory and token plan; nothing is built or written."""
    from hybridize.recipes.plan import load_throughput, plan_run, refusal

    throughput = load_throughput(args.throughput) if args.throughput else None
    plan = plan_run(cfg, pm, nproc=args.nproc or 1, out=args.out, throughput=throughput, check=False)
    print(plan.render())
    problem = refusal(plan, cfg.selection.probe_group_size)
    if problem:
        print(f"hybridize: error: {problem}", file=sys.stderr)
        return 2
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Several selectors head to head at several budgets and seeds; OUT/compare.json, compare.md and plots."""
    from hybridize.recipes.compare import compare, load_compare_config

    pm = _command_pm(args)
    base, ccfg = load_compare_config(args.config, args.set, pm=pm)
    result = compare(base, ccfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, pm=pm)
    spent, alone = result["tokens"]["spent"], result["tokens"]["standalone_sum"]
    print("\n" + (Path(args.out) / "compare.md").read_text())
    print(f"tokens: selection {spent['selection']:,} spent vs {alone['selection']:,} for the rows run one by one; "
          f"final distillation {spent['final_distill']:,} vs {alone['final_distill']:,} ({spent['final_hybrids']} distinct hybrids)")
    print(f"wrote {args.out}/compare.json, compare.md, compare_metrics.png, compare_layers.png ({result['wall_seconds']} s)")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The offline demo: a self-trained recall teacher, then kl-greedy-add vs uniform vs random."""
    from hybridize.recipes.quickstart import quickstart

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    result = quickstart(args.out, cache_dir=args.cache_dir, seeds=seeds, ratio=args.ratio, overrides=args.set,
                        resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, pm=_command_pm(args))
    qs = result["quickstart"]
    info = qs["teacher_info"]
    spec = info["spec"]
    print(f"\nteacher: Llama {spec['layers']} layers, d={spec['hidden']}, trained here on the synthetic recall corpus "
          f"({info['train_tokens']:,} tokens, {info['train_seconds']} s; recall accuracy {info['recall_accuracy']:.3f}); "
          f"cached in {qs['teacher']}")
    print(f"GDN hybrids with {result['table'][0]['k']} of {result['n_layers']} layers softmax, seeds {result['seeds']}; "
          "hybridize_recall = exact match of the recalled value (lm-eval task), heldout_kl = KL(teacher || hybrid) per token\n")
    print((Path(args.out) / "compare.md").read_text())
    print(f"plots: {args.out}/compare_metrics.png, {args.out}/compare_layers.png; all numbers: {args.out}/compare.json; "
          f"the compare config: {args.out}/quickstart.yaml ({qs['wall_seconds']} s)")
    return 0


def _eval_refs(args: argparse.Namespace) -> list[Any]:
    """Evaluator refs from `hybridize eval` flags: --tasks becomes one lm-eval evaluator, --evaluator adds any other."""
    from hybridize.registry.configs import ComponentRef
    from hybridize.errors import ConfigError
    from hybridize.recipes.yamlio import parse_yaml

    refs = []
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks:
        params: dict[str, Any] = {"tasks": tasks, "batch_size": args.batch_size, "online": args.online}
        for key, value in (("max_seq_lengths", args.max_len), ("limit", args.limit), ("essays_dir", args.essays), ("swde_data", args.swde_data)):
            if value is not None:
                params[key] = value
        refs.append(ComponentRef(name="lm-eval", params=params))
    for raw in args.evaluator:
        value = parse_yaml(raw, source=f"--evaluator {raw!r}")
        refs.append(ComponentRef.parse(value, where=f"--evaluator {raw!r}"))
    if not refs:
        raise ConfigError("hybridize eval needs --tasks (lm-eval task names, e.g. niah_single_1,swde) or --evaluator '{name: perplexity, data: FILE}'")
    return refs


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved hybrid (or a plain HF teacher directory) with lm-eval tasks and other evaluators."""
    from hybridize.training.devices import device_problem
    from hybridize.evaluate import markdown_table, parse_evaluators, run_evaluators
    from hybridize.recipes.evaluation import load_for_eval
    from hybridize.errors import ConfigError
    from hybridize.atomic_io import write_json, write_json_text
    from hybridize.training.devices import resolve_device
    from hybridize.recipes.rundir import check_eval_out, prepare_eval_out

    if args.out is not None:
        check_eval_out(args.out)  # before any work, read-only: a bad --out fails at once and nothing is created
    pm = _command_pm(args)
    refs, problems = parse_evaluators([{"name": r.name, **r.params} for r in _eval_refs(args)], pm, where="hybridize eval")
    device = device_problem(args.device, field="--device", fix="pass --device {suggest} or auto")
    if problems or device:
        raise ConfigError(problems + ([device] if device else []))
    target = load_for_eval(args.dir, device=str(resolve_device(args.device)), pm=pm)
    target.progress = not args.quiet
    result = run_evaluators(refs, target, pm)
    result = {"model": str(args.dir), "label": target.label, **result}
    table = markdown_table({target.label: result})
    print("\n" + table)
    if args.out is not None:
        out = prepare_eval_out(args.out)
        write_json(out / "eval.json", result)
        write_json_text(out / "eval.md", table + "\n")
        print(f"wrote {out}/eval.json and {out}/eval.md")
    return 0


def _relaunch(args: argparse.Namespace, cfg: Any) -> int:
    """``--nproc N``: check what can be checked here, then run the same command on N processes through torchrun."""
    from hybridize.training import launcher, parallel as distributed
    from hybridize.recipes.rundir import check_out_dir, run_inputs

    launcher.check_nproc(args.nproc, cfg.device)
    d = cfg.distill
    distributed.check_batch(d.batch_size, d.micro_batch_size or d.batch_size, distributed.Dist(world=args.nproc))
    if d.stage1_tokens:  # stage 1's own batch splits over the ranks too
        from hybridize.distill.batches import stage1_batch

        stage1_batch(d, cfg.data.seq_len, args.nproc)
    check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite, inputs=run_inputs(cfg))
    return launcher.launch(launcher.strip_nproc(args.argv), args.nproc)


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N processes through torchrun (one per GPU; CPU processes on gloo with device cpu): "
                        "the probes fan out over them and the distillation runs data parallel")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. distill.stage2_tokens=1e6")
    p.add_argument("--out", default="out", help="output directory (default: out)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from hybridize import __version__

    parser = argparse.ArgumentParser(prog="hybridize", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hybridize {__version__}")
    parser.add_argument(
        "--skip-broken-plugins", action="store_true", help="warn about plugins that fail to load instead of stopping"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list plugins and registered components")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("run", help="select the softmax layers, then distil and save the hybrid")
    _add_run_args(p)
    _add_nproc(p)
    p.add_argument("--dry-run", action="store_true", help="print the memory and token plan (per device, host, disk) and "
                   "exit; builds no model, writes nothing")
    p.add_argument("--throughput", metavar="FILE", help="with --dry-run: JSON {phase: tokens_per_s} for a time estimate "
                   "(phases stage1, probes, stage2, stage3)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("distill", help="distil a hybrid with an explicit list of softmax layers")
    _add_run_args(p)
    _add_nproc(p)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("compare", help="compare selectors head to head (a run config with a compare section)")
    _add_run_args(p)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("quickstart", help="offline demo: train a small recall teacher, compare kl-greedy-add, uniform and random")
    p.add_argument("--out", default="hybridize-quickstart", help="output directory (default ./hybridize-quickstart)")
    p.add_argument("--cache-dir", help="where the teacher is cached (default $HYBRIDIZE_CACHE or ~/.cache/hybridize)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    p.add_argument("--ratio", type=float, default=0.25, help="softmax ratio (default 0.25: 1 of the teacher's 4 layers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the compare config, e.g. --set distill.stage2_tokens=300000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue a killed quickstart in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)
    p = sub.add_parser("eval", help="evaluate a saved hybrid or a plain HF model directory (lm-eval tasks, perplexity, ...)")
    p.add_argument("dir", help="model directory: a saved hybrid (OUT/model) or a Hugging Face teacher")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. niah_single_1,niah_multikey_2,swde (or the group ruler)")
    p.add_argument("--max-len", type=int, action="append", metavar="N", help="RULER length in tokens (repeat for several; default 4096)")
    p.add_argument("--limit", type=int, help="documents per task (RULER: generated per length)")
    p.add_argument("--batch-size", type=int, default=8, help="HFLM batch size (default 8)")
    p.add_argument("--essays", help="directory of .txt essays for RULER's essay haystacks (e.g. ../shared/data/pg_essays)")
    p.add_argument("--swde-data", help="local SWDE .parquet/.jsonl (columns doc_id, file_name, key, value, text)")
    p.add_argument("--online", action="store_true", help="allow the Hugging Face hub (off by default)")
    p.add_argument("--evaluator", action="append", default=[], metavar="YAML", help="another evaluator, e.g. '{name: perplexity, data: FILE}'")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--out", help="directory for eval.json and eval.md")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_eval)
    from hybridize.recipes.export import add_export_command
    add_export_command(sub, _command_pm)
    return parser


@contextlib.contextmanager
def _library_progress(quiet: bool) -> Iterator[None]:
    """``--quiet`` also covers the progress bars of transformers, datasets and lm-eval (loading weights,
    generating splits, building and running requests): their switches are turned off for the call and
    back on afterwards, so ``main()`` called from Python leaves no trace. tqdm reads ``TQDM_DISABLE`` only
    at import, so bars that lm-eval makes with plain ``tqdm`` get ``disable=True`` as their default."""
    if not quiet:
        yield
        return
    import functools

    import tqdm as tqdm_lib
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import datasets.utils.logging as datasets_logging
    except ImportError:
        datasets_logging = None
    ds_was_on = datasets_logging.is_progress_bar_enabled() if datasets_logging else False
    if datasets_logging:
        datasets_logging.disable_progress_bar()
    init = tqdm_lib.tqdm.__init__
    tqdm_lib.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        tqdm_lib.tqdm.__init__ = init
        if was_on:
            hf_logging.enable_progress_bar()
        if ds_was_on:
            datasets_logging.enable_progress_bar()


@contextlib.contextmanager
def _plugin_warnings(skip_broken: bool) -> Iterator[None]:
    """``--skip-broken-plugins`` for every plugin manager the command builds (``HYBRIDIZE_SKIP_BROKEN_PLUGINS``),
    and a skipped plugin shown as one ``hybridize: warning:`` line; both undone afterwards."""
    import warnings

    from hybridize.errors import PluginLoadWarning
    from hybridize.registry.manager import ENV_SKIP_BROKEN

    old_env, old_show = os.environ.get(ENV_SKIP_BROKEN), warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, PluginLoadWarning):
            print(f"hybridize: warning: {message}", file=sys.stderr)
        else:
            old_show(message, category, filename, lineno, file, line)

    if skip_broken:
        os.environ[ENV_SKIP_BROKEN] = "1"
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old_show
        if old_env is None:
            os.environ.pop(ENV_SKIP_BROKEN, None)
        else:
            os.environ[ENV_SKIP_BROKEN] = old_env


def resume_hint(args: argparse.Namespace) -> str:
    """How to continue after an interruption: the same command with ``--resume`` (and without ``--overwrite``)."""
    import shlex

    if not hasattr(args, "resume") or not getattr(args, "out", None):
        return "nothing was saved to continue from; run the command again"
    argv = [a for a in args.argv if a != "--overwrite"]
    argv += [] if "--resume" in argv else ["--resume"]
    return f"the checkpoints in {args.out!r} are kept: continue with `{shlex.join(['hybridize', *argv])}`"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hybridize`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("run", "distill"):
            raise HybridizeError(f"hybridize {args.command} runs on one process; only `run` and `distill` run on several "
                                 "(torchrun or --nproc N)")
        with _library_progress(getattr(args, "quiet", False)), _plugin_warnings(args.skip_broken_plugins):
            return args.func(args)
    except KeyboardInterrupt:
        print(f"hybridize: interrupted (Ctrl-C); {resume_hint(args)}", file=sys.stderr)
        return 130
    except RemoteError:  # rank 0 failed and printed why
        return 2
    except OSError as exc:  # a file or directory the checks above could not foresee: one line, never a traceback
        where = f" {exc.filename!r}" if exc.filename else ""
        print(f"hybridize: error: cannot use{where}: {exc.strerror or exc}; {resume_hint(args)}", file=sys.stderr)
        return 2
    except HybridizeError as exc:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        where = f" (rank {rank})" if rank != "0" else ""
        print(f"hybridize: error{where}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
