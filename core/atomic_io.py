"""Manifests of file hashes: a directory (or checkpoint) is complete only when its manifest says so.

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
from collections.abc import Iterable, Iterator
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
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or "unexpected pos" in str(exc)
        if not (full or isinstance(exc, OSError)):
            raise
        if full:
            import shutil

            free = shutil.disk_usage(path.parent).free
            need = f"it needs about {_human(needed)}" if needed else "it needs more space"
            raise WriteError(
                f"no space left on the device writing {str(path)!r}: {need} and {_human(free)} are free there; free "
                "some space (or choose an --out on another disk), then --resume continues from the last checkpoint"
            ) from exc
        raise WriteError(f"cannot write {str(path)!r} ({exc.strerror or exc}); check that directory and its disk, then "
                         "--resume continues from the last checkpoint") from exc
