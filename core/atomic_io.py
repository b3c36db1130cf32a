"""Durable writes and manifests of file hashes: the one home of "write it atomically".

Every output file goes through :func:`atomic_write` (write a temporary file beside it, flush it to
disk, rename it into place; a failed write leaves no temporary file): :func:`write_json`,
:func:`write_json_text`, :func:`atomic_torch_save` (checkpoints, with a manifest record) and figures.
Directories (a saved hybrid) go through :func:`atomic_dir` and :func:`replace_dir`.

A directory (or checkpoint) is complete only when its manifest says so.

A saved hybrid is written to a temporary directory, its manifest (sha256 and size of every file)
is written last, and the directory is renamed into place; :func:`verify_manifest` refuses a
directory whose manifest is missing or does not match, naming the bad file. Checkpoints are
single files replaced by an atomic rename; their directory's manifest records the new hash
*before* the rename (keeping the old one as ``previous``) and drops ``previous`` after it, so a
kill at any moment leaves a checkpoint that matches its record, and a damaged one is refused.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from hybridize.errors import HybridizeError

MANIFEST = "hybridize-manifest.json"


class IntegrityError(HybridizeError):
    """A file of a saved directory or checkpoint is missing, truncated or altered."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` and flush it to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_manifest_file(directory: Path, files: dict[str, dict[str, Any]]) -> Path:
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    data = (json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True) + "\n").encode()
    with clean_write(path, tmp, len(data)):
        fsync_write(tmp, data)
    os.replace(tmp, path)
    return path


def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: str | Path, *, exclude: Iterable[str] = ()) -> Path:
    """Hash every file under ``directory`` (except ``exclude``d top-level names and dot files) into its manifest."""
    directory = Path(directory)
    skip = set(exclude) | {MANIFEST}
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.parts[0] not in skip and not any(p.startswith(".") for p in rel.parts):
            files[rel.as_posix()] = _entry(path)
    return _write_manifest_file(directory, files)


def read_manifest(directory: str | Path, *, what: str) -> dict[str, dict[str, Any]] | None:
    """The ``files`` table of a directory's manifest, or None when it has none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{what} {str(directory)!r}: its manifest {MANIFEST} is unreadable ({exc})") from exc


def _check(directory: Path, name: str, record: dict[str, Any], what: str, fix: str) -> None:
    path = directory / name
    if not path.is_file():
        raise IntegrityError(f"{what} {str(directory)!r} is incomplete: file {name!r} listed in {MANIFEST} is missing; {fix}")
    got = sha256_file(path)
    if got not in (record["sha256"], record.get("previous")):
        raise IntegrityError(
            f"{what} {str(directory)!r} is damaged: file {name!r} has {path.stat().st_size} bytes and sha256 "
            f"{got[:12]}..., but {MANIFEST} records {record.get('bytes')} bytes and sha256 {record['sha256'][:12]}...; {fix}"
        )


def verify_manifest(directory: str | Path, *, what: str = "saved hybrid", fix: str = "save it again") -> None:
    """Check every file listed in ``directory``'s manifest.

    Raises:
        IntegrityError: no manifest (an interrupted or foreign save), or a listed file missing or altered.
    """
    directory = Path(directory)
    files = read_manifest(directory, what=what)
    if files is None:
        raise IntegrityError(
            f"{what} {str(directory)!r} has no {MANIFEST}: its save did not finish (or it was not written by "
            f"hybridize); {fix}"
        )
    for name, record in sorted(files.items()):
        _check(directory, name, record, what, fix)


# -- checkpoints: one file each, replaced by an atomic rename -----------------------------------------
def record_checkpoint(path: Path, tmp: Path) -> None:
    """Before ``tmp`` is renamed to ``path``: record its hash, keeping the current one as ``previous``."""
    files = read_manifest(path.parent, what="checkpoint directory") or {}
    old = files.get(path.name, {}).get("sha256") if path.exists() else None
    files[path.name] = {**_entry(tmp), "previous": old}
    _write_manifest_file(path.parent, files)


def commit_checkpoint(path: Path) -> None:
    """After the rename: the checkpoint now has exactly one valid hash."""
    files = read_manifest(path.parent, what="checkpoint directory") or {}
    files.get(path.name, {}).pop("previous", None)
    _write_manifest_file(path.parent, files)


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint against its directory's manifest before it is loaded.

    Raises:
        IntegrityError: naming the file, when it has no record or does not match it.
    """
    fix = "delete that file to redo its stage, or start again with --overwrite"
    files = read_manifest(path.parent, what="checkpoint directory")
    if files is None or path.name not in files:
        raise IntegrityError(
            f"checkpoint {str(path)!r} has no record in {str(path.parent / MANIFEST)!r}, so it cannot be trusted; {fix}"
        )
    _check(path.parent, path.name, files[path.name], "checkpoint directory", fix)


def forget_checkpoint(path: Path) -> None:
    """Delete a checkpoint that is no longer needed and drop its record from the directory's manifest."""
    files = read_manifest(path.parent, what="checkpoint directory") or {}
    if files.pop(path.name, None) is not None:
        _write_manifest_file(path.parent, files)
    path.unlink(missing_ok=True)


# -- writes that fail (disk full, read-only, ...) leave no temporary file ------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class WriteError(HybridizeError):
    """An output could not be written (disk full, no permission, ...); no temporary file was left."""


@contextlib.contextmanager
def clean_write(path: Path, tmp: Path, needed: int | None = None) -> Iterator[None]:
    """Delete ``tmp`` when writing it fails, and turn the ``OSError`` into one line naming ``path``.

    A full disk (``ENOSPC``, also inside torch's "unexpected pos" errors) says how much space the
    file needs and how much is free; any other OS error names its cause.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "unexpected pos" in str(exc)
        if not (full or isinstance(exc, OSError)):
            raise
        if full:
            free = shutil.disk_usage(path.parent).free
            need = f"it needs about {_human(needed)}" if needed else "it needs more space"
            raise WriteError(
                f"no space left on the device writing {str(path)!r}: {need} and {_human(free)} are free there; free "
                "some space (or choose an --out on another disk), then --resume continues from the last checkpoint"
            ) from exc
        raise WriteError(f"cannot write {str(path)!r} ({exc.strerror or exc}); check that directory and its disk, then "
                         "--resume continues from the last checkpoint") from exc


# -- the durable writes: a temporary file, flushed, renamed into place ---------------------------------
def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], Any], *, tmp: Path | None = None, needed: int | None = None,
                 before_rename: Callable[[Path], Any] | None = None) -> None:
    """Write ``path`` durably: ``write(tmp)``, flush ``tmp`` to disk, ``before_rename(tmp)``, rename it to ``path``.

    Args:
        path: the file to write; at every moment it is the old complete file or the new one.
        write: writes the content to the path it is given (the temporary file).
        tmp: the temporary file (default ``.NAME.tmp`` beside ``path``).
        needed: about how many bytes the file takes, for the message on a full disk.
        before_rename: called with the written temporary file just before the rename (a manifest record).

    Raises:
        WriteError: the write failed (disk full, no permission, ...); the temporary file is gone.
    """
    tmp = path.with_name(f".{path.name}.tmp") if tmp is None else tmp
    with clean_write(path, tmp, needed):
        write(tmp)
        _fsync_path(tmp)
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)


def write_json_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and an atomic rename (no half-written file, none left over)."""
    data = text.encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file (flushed to disk) and an atomic rename."""
    write_json_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def save_figure(fig: Any, path: Path) -> None:
    """``savefig`` to a temporary name with the same suffix (its format), then rename: never half a PNG."""
    atomic_write(path, fig.savefig, tmp=path.with_name(f".{path.stem}.tmp{path.suffix}"))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint: about the size of its file."""
    if hasattr(obj, "nelement") and hasattr(obj, "element_size"):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` through a temporary file and an atomic rename, its hash in the manifest.

    The directory's manifest records the new file's sha256 before the rename (:func:`record_checkpoint`),
    so :func:`verify_checkpoint` can tell a damaged file from a good one.
    """
    import torch

    from hybridize import faults

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed process
        stale.unlink(missing_ok=True)

    def record(tmp: Path) -> None:
        record_checkpoint(path, tmp)
        faults.kill_point("checkpoint-write")

    atomic_write(path, lambda tmp: torch.save(obj, tmp), tmp=path.with_name(f".{path.name}.tmp{os.getpid()}"),
                 needed=tensor_bytes(obj), before_rename=record)
    commit_checkpoint(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary directory into place.

    An old ``final`` is first renamed aside, so at every moment ``final`` is either the old
    complete directory, absent, or the new complete one.
    """
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def atomic_dir(path: Path, write: Callable[[Path], Any], *, needed: int | None = None,
               before_rename: Callable[[Path], Any] | None = None) -> Path:
    """Write a directory durably: ``write(tmp)`` into ``.NAME.tmp``, ``before_rename(tmp)``, :func:`replace_dir`.

    A temporary directory left by an interrupted write is removed first; one whose ``before_rename`` raises is
    removed too (``path`` is left as it was).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():  # left by an interrupted write
        shutil.rmtree(tmp)
    with clean_write(path, tmp, needed):
        write(tmp)
    if before_rename is not None:
        try:
            before_rename(tmp)
        except Exception:  # a check of the written directory failed: its own temporary directory goes
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    replace_dir(tmp, path)
    return path
