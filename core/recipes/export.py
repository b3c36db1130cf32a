"""``hybridize export DIR --format NAME --out OUT``: a saved hybrid in a layout that stock inference engines serve.

Everything that can be refused is refused before anything is written: the output directory, the format name
(the ``exporter`` registry), whether this installation can write it, the exporter's check of the hybrid's
config (a variant or option with no place in the format: one message naming it and the formats that exist)
and the healing inputs. Then the hybrid is loaded and converted; where the format holds it only approximately,
the parity of the conversion is measured and, without ``--heal-tokens``, the export is refused with those
numbers; with it, the converted model is healed by KL to the hybrid (:mod:`hybridize.distill.heal`). The
directory is written by :func:`hybridize.model.export.write_export`, with its parity report beside the weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from hybridize.errors import ConfigError, ExportError

_v = attrs.validators


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return attrs.field(default=default, metadata={"help": help}, **kw)


@attrs.frozen(kw_only=True)
class ExportOptions:
    """The options of one export; each field is also a flag of ``hybridize export`` (``--heal-tokens`` ...)."""

    format: str = _opt("qwen3_5", "export format (`hybridize plugins` lists them under exporter; default qwen3_5)")
    heal_tokens: int = _opt(0, "where the format holds the hybrid only approximately: train the converted model by KL "
                               "to the hybrid on N tokens of --data first", validator=_v.ge(0))
    data: str | None = _opt(None, "text / jsonl file or directory for --heal-tokens (the held-out KL is measured on it)")
    seq_len: int = _opt(256, "block length of the healing data (default 256)", validator=_v.ge(2))
    heal_lr: float = _opt(1e-3, "healing lr of the attention and linear-attention layers; the rest trains at a tenth "
                                "(default 1e-3)", validator=_v.gt(0.0))
    batch_size: int = _opt(8, "healing blocks per step (default 8)", validator=_v.gt(0))
    device: str = _opt("auto", "auto (CUDA when available), cpu, cuda, cuda:N")
    overwrite: bool = _opt(False, "replace an earlier export in --out")
    seed: int = _opt(0, "seed of the healing data split and order")
    progress: bool = True


def add_export_command(sub: Any, command_pm: Any) -> None:
    """``hybridize export DIR --out OUT [--format ...]``: its flags are the fields of :class:`ExportOptions`."""
    p = sub.add_parser("export", help="write a saved hybrid in a layout stock inference engines serve (qwen3_5: "
                       "transformers, vLLM), with a parity report beside it")
    p.add_argument("dir", help="a saved hybrid (OUT/model)")
    p.add_argument("--out", required=True, help="a new or empty directory for the exported model")
    for f in attrs.fields(ExportOptions):
        if "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: Any) -> int:
        given = {f.name: getattr(args, f.name) for f in attrs.fields(ExportOptions) if "help" in f.metadata}
        print_export(export(args.dir, args.out, ExportOptions(**given, progress=not args.quiet), pm=command_pm(args)))
        return 0

    p.set_defaults(func=run)


def print_export(report: dict[str, Any]) -> None:
    """What ``hybridize export`` prints: the layout, every difference, the healing and the parity."""
    from hybridize.model.export import REPORT, describe

    kinds, heal = report["layer_types"], report["heal"]
    softmax = [i for i, k in enumerate(kinds) if k == "full_attention"]
    print(f"\n{report['class']} ({report['model_type']}): {len(kinds)} layers, full attention at {softmax}; "
          f"{'exact' if report['exact'] else 'approximate'}")
    for line in report["differences"]:
        print(f"  differs: {line}")
    if heal:
        print(f"  healed on {heal['tokens']:,} tokens: held-out KL to the hybrid {heal['heldout_kl_before']:.4g} -> "
              f"{heal['heldout_kl_after']:.4g} ({heal['heldout_blocks']} blocks of {heal['seq_len']})")
        print(f"  parity before healing: {describe(report['parity_before_heal'])}")
    print(f"  parity of the written model: {describe(report['parity'])}")
    print(f"wrote {report['out']} (AutoModelForCausalLM loads it; the report is {report['out']}/{REPORT})")


def check_export_out(out: str | Path, *, overwrite: bool, source: Path) -> Path:
    """``--out`` must be new or empty, or (with ``--overwrite``) an earlier export: only then may it be replaced.

    Raises:
        ExportError: naming the directory and why it is not hybridize's to replace.
    """
    from hybridize.atomic_io import MANIFEST, read_manifest
    from hybridize.model.export import REPORT
    from hybridize.recipes.rundir import check_writable_place, out_path

    path = out_path(out)
    check_writable_place(path)
    real = path.resolve()
    if real == source.resolve() or real in source.resolve().parents or Path.cwd().resolve() in (real, *real.parents):
        raise ExportError(f"export --out {str(path)!r} is the hybrid's directory, one of its parents or the current "
                          "directory; give --out a directory of its own")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise ExportError(f"export --out {str(path)!r} already exists and is not empty; give a new directory, or pass "
                          "--overwrite to replace an earlier export there")
    files = read_manifest(path, what="export directory") or {}
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    foreign = sorted(present - set(files))
    if REPORT not in files or foreign:
        why = f"holds files it did not write ({', '.join(foreign[:3])})" if foreign else f"has no {REPORT}"
        raise ExportError(f"--overwrite refused: export --out {str(path)!r} is not an export written by hybridize (it {why}); "
                          "move it away or choose another --out")
    return path


def _refused(path: Path, fmt: str, refusals: tuple[str, ...], registry: Any) -> ExportError:
    formats = "; ".join(registry[name].factory(registry[name].build_config()).summary for name in sorted(registry))
    return ExportError(f"{str(path)!r} cannot be exported to {fmt!r}: {'; '.join(refusals)}. Formats that exist: "
                       f"{formats}. Nothing was written")


def _inputs(path: Path, opts: ExportOptions) -> Any:
    """The hybrid's config (no weights), after the checks of the path and the healing inputs."""
    from transformers import AutoConfig

    from hybridize.model.hybrid import PREFIX, register_with_transformers

    if not (path / "config.json").is_file():
        raise ConfigError(f"hybridize export: {str(path)!r} must be a saved hybrid directory (OUT/model) with a config.json")
    problems = []
    if opts.heal_tokens and not opts.data:
        problems.append("hybridize export --heal-tokens needs --data (a text / jsonl file or directory to heal on)")
    if opts.data and not os.path.exists(opts.data):
        problems.append(f"hybridize export --data must be an existing file or directory; got {opts.data!r}")
    if problems:
        raise ConfigError(problems)
    register_with_transformers()
    config = AutoConfig.from_pretrained(path)
    if not str(config.model_type).startswith(PREFIX):
        raise ConfigError(f"hybridize export: {str(path)!r} is a {config.model_type!r} checkpoint, not a hybrid saved by hybridize")
    if opts.heal_tokens and opts.seq_len > config.max_position_embeddings:
        raise ConfigError(f"hybridize export --seq-len must be <= the hybrid's max_position_embeddings="
                          f"{config.max_position_embeddings}; got {opts.seq_len}")
    return config


def export(path: str | Path, out: str | Path, opts: ExportOptions, *, pm: Any = None) -> dict[str, Any]:
    """Export the hybrid saved in ``path`` to ``out`` in format ``opts.format``; return the parity report."""
    from hybridize.registry.manager import get_plugin_manager

    path = Path(path)
    out = check_export_out(out, overwrite=opts.overwrite, source=path)
    pm = pm or get_plugin_manager()
    registry = pm.registry("exporter")
    entry = registry[opts.format]  # an unknown format: "did you mean", and the formats that exist
    exporter = entry.factory(entry.build_config())
    config = _inputs(path, opts)
    problem = exporter.unavailable()
    if problem:
        raise ExportError(problem)
    check = exporter.check(config)
    if check.refusals:
        raise _refused(path, opts.format, check.refusals, registry)
    return _convert_and_write(path, out, opts, pm, exporter, check)


def _load(path: Path, opts: ExportOptions, pm: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    from hybridize.model.hybrid import load_hybrid
    from hybridize.model.teacher import TOKENIZER_FILES
    from hybridize.training.devices import device_problem, resolve_device

    problem = device_problem(opts.device, field="hybridize export --device", fix="pass --device {suggest} or auto")
    if problem:
        raise ConfigError(problem)
    device = resolve_device(opts.device)
    model = load_hybrid(path, device=device, pm=pm).eval()
    has_tokenizer = any((path / f).exists() for f in TOKENIZER_FILES)
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None, device


def _convert_and_write(path: Path, out: Path, opts: ExportOptions, pm: Any, exporter: Any, check: Any) -> dict[str, Any]:
    from hybridize.model.export import check_converted, describe, fixed_prompts, parity, write_export

    model, tokenizer, device = _load(path, opts, pm)
    converted = exporter.convert(model)
    check_converted(opts.format, model, converted, check.differences)
    prompts = fixed_prompts(tokenizer, model.config.vocab_size)
    before = parity(model, converted.model, prompts)
    if check.differences and not opts.heal_tokens:
        raise ExportError(
            f"the {opts.format!r} layout holds {str(path)!r} only approximately: {'; '.join(check.differences)}. Converted "
            f"as it is, the export would differ from the hybrid on the fixed prompts by {describe(before)}. Pass "
            "--heal-tokens N --data FILE to heal the converted model by KL to the hybrid first (the KL before and after "
            "is reported); nothing was written")
    healed = _heal(model, converted.model, tokenizer, opts, device) if check.differences else None
    after = parity(model, converted.model, prompts) if healed else before

    def finish(reloaded: dict[str, Any], target: Any) -> dict[str, Any]:
        return _report(path, opts, check, converted, target, before, after, reloaded, healed, tokenizer is not None)

    report = write_export(converted.model, out, source=model, tokenizer=tokenizer, prompts=prompts, finish=finish)
    return {**report, "out": str(out)}


def _heal(model: Any, target: Any, tokenizer: Any, opts: ExportOptions, device: Any) -> dict[str, Any]:
    from hybridize.distill.heal import HealConfig, heal
    from hybridize.training.data import DataConfig, prepare_data

    if tokenizer is None:
        raise ConfigError(f"hybridize export --heal-tokens needs the hybrid's tokenizer to read --data {opts.data!r}; "
                          "save the tokenizer beside the hybrid")
    data = prepare_data(DataConfig(train=opts.data, seq_len=opts.seq_len), tokenizer,
                        seed=opts.seed)
    cfg = HealConfig(tokens=opts.heal_tokens, lr=opts.heal_lr, lr_other=opts.heal_lr / 10, batch_size=opts.batch_size,
                     seed=opts.seed)
    return {"data": str(opts.data), **heal(model, target, data, cfg, device=device, progress=opts.progress)}


def _report(path: Path, opts: ExportOptions, check: Any, converted: Any, target: Any, before: dict, after: dict,
            reloaded: dict, healed: dict | None, tokenized: bool) -> dict[str, Any]:
    import transformers

    from hybridize import __version__
    from hybridize.model.export import PROMPTS

    cfg = target.config
    return {
        "format": opts.format, "source": str(path), "class": type(target).__name__, "model_type": cfg.model_type,
        "layer_types": list(getattr(cfg, "layer_types", []) or []), "exact": not check.differences,
        "differences": list(check.differences), "dropped_tensors": sorted(converted.dropped),
        "parity": reloaded, "parity_before_heal": before if healed else None, "parity_in_memory": after,
        "heal": healed, "prompts": list(PROMPTS) if tokenized else "4 seeded random prompts of 24 ids (no tokenizer)",
        "versions": {"hybridize": __version__, "transformers": transformers.__version__},
    }
