"""Output directories that are safe to point anywhere: hybridize deletes only what it wrote.

When hybridize creates (or first writes into an empty) ``OUT`` it writes :data:`MARKER` there.
``--overwrite`` then removes only a directory that has this marker and holds nothing but the
names hybridize writes (:data:`FILES`, :data:`TREES`, its temporary ``.NAME.tmp*`` files); inside
``checkpoints/``, ``model/`` and ``models/`` every file must be a manifest, ``rows.json``, a
temporary file or a file recorded in its directory's manifest. It refuses, naming the path, an
empty ``--out``, the current directory or one of its parents, a home directory, a directory that
is or holds the teacher or the data, and ``--resume`` together with ``--overwrite``.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from hybridize.errors import HybridizeError

MARKER = "hybridize-out.json"
#: the top-level files a run, distill, compare, quickstart or eval writes into OUT
FILES = frozenset({
    MARKER, "hybridize-manifest.json", "run-config.json", "teacher.json", "resumes.jsonl", "result.json",
    "metrics.jsonl", "scores.png", "jaccard.png", "distill.png", "compare.json", "compare.md",
    "compare_metrics.png", "compare_layers.png", "quickstart.yaml", "eval.json", "eval.md",
})
#: the top-level directories hybridize writes (their content is checked file by file)
TREES = frozenset({"model", "models", "checkpoints"})
_NEVER_AS_FILE = ("rows.json", "hybridize-manifest.json")


class OutDirError(HybridizeError):
    """``--out`` cannot be used (or deleted) as asked."""


def _is_temporary(name: str) -> bool:
    """``.NAME.tmp``, ``.NAME.tmpPID``, ``.NAME.tmp.png``, ``.model.old``: hybridize's temporary names."""
    return name.startswith(".") and (".tmp" in name or name.endswith(".old"))


def out_path(out: str | Path, option: str = "--out") -> Path:
    """``out`` as a path; an empty value (an unset shell variable) is refused, never taken as ``.``."""
    if not str(out).strip():
        raise OutDirError(f"option '{option}' must name a directory (an empty value is never taken as the current "
                          f"directory); got {str(out)!r}")
    return Path(out)


def check_writable_place(out: Path, option: str = "--out") -> None:
    """Refuse an ``out`` that is a file or lies under a file (no traceback from ``mkdir`` later)."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"option '{option}' must be a directory; got {str(out)!r}, which is a file: give a new or "
                          "empty directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutDirError(f"option '{option}' must be a directory path; got {str(out)!r}, but {str(parent)!r} "
                                  "is a file: choose another --out")
            return


def _foreign_in_tree(root: Path, top: str) -> list[str]:
    """Files under one of hybridize's directories that it did not write (symlinks count as foreign)."""
    if root.is_symlink() or not root.is_dir():
        return [top]
    foreign = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if _is_temporary(here.name):  # an interrupted save: everything in it is hybridize's
            dirnames[:] = []
            continue
        recorded = _recorded(here)
        for name in sorted(filenames):
            path = here / name
            mine = name in _NEVER_AS_FILE or _is_temporary(name) or name in recorded
            if path.is_symlink() or not mine:
                foreign.append(path.relative_to(root.parent).as_posix())
        foreign += [(here / d).relative_to(root.parent).as_posix() for d in dirnames if (here / d).is_symlink()]
    return foreign


def _recorded(directory: Path) -> set[str]:
    try:
        return set(json.loads((directory / "hybridize-manifest.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def foreign_files(out: Path) -> list[str]:
    """Everything in ``out`` that hybridize did not write (relative paths, sorted)."""
    foreign = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in TREES:
            foreign += _foreign_in_tree(entry, name)
        elif entry.is_symlink() or not (name in FILES and entry.is_file() or _is_temporary(name)):
            foreign.append(name)
    return foreign


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_not_precious(out: Path, inputs: Mapping[str, str | Iterable[str]]) -> None:
    """Refuse to delete the current directory, its parents, a home directory, or the run's inputs."""
    real = out.resolve()
    refuse = f"--overwrite refused: output directory {str(out)!r}"
    fix = "give --out a directory of its own"
    if _inside(Path.cwd().resolve(), real):
        raise OutDirError(f"{refuse} is the current directory or one of its parents; {fix}")
    homes = {Path.home().resolve(), *(p.resolve() for p in Path("/home").glob("*") if p.is_dir())}
    if real in homes or real == Path(real.anchor):
        raise OutDirError(f"{refuse} is a home directory (or the file-system root); {fix}")
    for where, value in inputs.items():
        for item in [value] if isinstance(value, str) else list(value or []):
            path = Path(item).expanduser()
            if path.exists() and _inside(path.resolve(), real):
                raise OutDirError(f"{refuse} is or holds {where} {str(item)!r}; {fix}")


def check_overwrite(out: Path, inputs: Mapping[str, str | Iterable[str]] = {}) -> None:  # noqa: B006 - read only
    """Everything that must hold before ``out`` may be emptied; nothing is changed.

    Raises:
        OutDirError: naming ``out`` and why it is not hybridize's to delete.
    """
    _check_not_precious(out, inputs)
    if not (out / MARKER).is_file():
        raise OutDirError(
            f"--overwrite refused: output directory {str(out)!r} was not created by hybridize (it has no {MARKER}); "
            "delete it yourself if it is really disposable, or choose another --out"
        )
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutDirError(f"--overwrite refused: output directory {str(out)!r} holds files hybridize did not write "
                          f"({shown}); move them away or choose another --out")


def empty_own_dir(out: Path) -> None:
    """Remove what hybridize wrote in ``out`` (after :func:`check_overwrite`); ``out`` itself stays."""
    for entry in sorted(out.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_marker(out: Path, command: str) -> None:
    """``OUT/hybridize-out.json``: this directory was created by hybridize (so ``--overwrite`` may empty it)."""
    from hybridize import __version__
    from hybridize.atomic_io import write_json

    write_json(out / MARKER, {"format": 1, "created_by": f"hybridize {__version__}", "command": command})


def check_out_dir(out: str | Path, *, resume: bool, overwrite: bool,
                  inputs: Mapping[str, str | Iterable[str]] = {}) -> bool:  # noqa: B006 - read only
    """Whether ``out`` holds files; refuse what :func:`prepare_out_dir` would refuse (nothing is changed)."""
    if resume and overwrite:
        raise OutDirError(f"options '--resume' and '--overwrite' cannot be combined: --resume continues the run in "
                          f"{str(out)!r}, --overwrite deletes it; pass one of them")
    path = out_path(out)
    check_writable_place(path)
    full = path.is_dir() and any(path.iterdir())
    if full and not (resume or overwrite):
        raise OutDirError(f"output directory {str(path)!r} already exists and is not empty; pass --resume to continue "
                          "that run or --overwrite to start again")
    if full and overwrite:
        check_overwrite(path, inputs)
    if full and resume and not ((path / MARKER).is_file() or (path / "run-config.json").is_file()):
        raise OutDirError(f"--resume refused: output directory {str(path)!r} holds no hybridize run (no {MARKER} or "
                          "run-config.json); give the --out of the run to continue, or another --out to start one")
    return full


def prepare_out_dir(out: str | Path, *, resume: bool, overwrite: bool, command: str = "run",
                    inputs: Mapping[str, str | Iterable[str]] = {}) -> Path:  # noqa: B006 - read only
    """Create (or empty, with ``overwrite``, or keep, with ``resume``) the output directory, marked as hybridize's."""
    full = check_out_dir(out, resume=resume, overwrite=overwrite, inputs=inputs)
    path = Path(out)
    if full and overwrite:
        empty_own_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / MARKER).exists():
            write_marker(path, command)
    except OSError as exc:
        raise OutDirError(f"output directory {str(path)!r} cannot be created or written ({exc.strerror or exc}); "
                          "choose a writable --out") from exc
    return path


def check_eval_out(out: str | Path) -> Path:
    """What :func:`prepare_eval_out` would refuse, checked without writing anything; returns the path."""
    path = out_path(out)
    check_writable_place(path)
    if path.is_dir() and not (path / MARKER).is_file():
        theirs = [n for n in ("eval.json", "eval.md") if (path / n).exists()]
        if theirs:
            raise OutDirError(f"eval --out {str(path)!r} holds {', '.join(theirs)} that hybridize did not write; give a "
                              "new or empty directory")
    return path


def prepare_eval_out(out: str | Path) -> Path:
    """``hybridize eval --out``: a new or empty directory, or one where eval.json / eval.md are hybridize's."""
    path = check_eval_out(out)
    try:
        empty = not path.is_dir() or not any(path.iterdir())
        path.mkdir(parents=True, exist_ok=True)
        if empty:
            write_marker(path, "eval")
    except OSError as exc:
        raise OutDirError(f"eval --out {str(path)!r} cannot be created or written ({exc.strerror or exc}); choose a "
                          "writable --out") from exc
    return path


def run_inputs(cfg: object) -> dict[str, str | list[str]]:
    """The paths a run reads (its teacher and data), which ``--overwrite`` must never delete."""
    data = getattr(cfg, "data", None)
    found = {"the teacher (run field 'teacher')": getattr(cfg, "teacher", None),
             "the data (data field 'train')": getattr(data, "train", None),
             "the data (data field 'heldout')": getattr(data, "heldout", None)}
    return {where: value for where, value in found.items() if value}
