"""What ``--resume`` may change, and the teacher it must find again.

``OUT/run-config.json`` records the resolved config. A resumed run may change only what cannot
invalidate finished work, and says what changed (recorded in ``OUT/resumes.jsonl``):

- learning rates (:data:`LR_KEYS`): the resumed stage continues with the new peak lr on the same
  schedule (:meth:`hybridize.training.loop.Loop.load_state_dict`); the lrs that the selection's probes
  borrow may not change while the selection is unfinished;
- evaluators and the final distillation's evaluation settings (:data:`EVAL_KEYS`);
- stage budgets (:data:`BUDGET_KEYS`), raised only, and only while no later stage has a checkpoint.

In ``compare`` nothing may change once a row has finished (it would mix two configs in one table).
``OUT/teacher.json`` holds a fingerprint of the teacher's weight files; ``--resume`` refuses another teacher.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from hybridize.errors import HybridizeError

RUN_CONFIG, TEACHER, RESUMES = "run-config.json", "teacher.json", "resumes.jsonl"
LR_KEYS = {"distill.stage1_lr": "stage1", "distill.stage2_lr_attn": "stage2", "distill.stage2_lr_other": "stage2",
           "distill.stage3_lr": "stage3"}
EVAL_KEYS = {"distill.eval_every", "distill.eval_blocks"}
BUDGET_KEYS = {"distill.stage1_tokens": "stage1", "distill.stage2_tokens": "stage2", "distill.stage3_tokens": "stage3"}
#: the checkpoint files of the stages that come after each stage (their work builds on it)
_LATER = {"stage1": ("stage2.pt", "stage3.pt", "probes*.pt"), "stage2": ("stage3.pt",), "stage3": ()}
#: distill keys that the probes read (the lrs only when selection.probe_lr_* is 0)
_PROBE_READS = {"distill.stage2_lr_attn": "probe_lr_attn", "distill.stage2_lr_other": "probe_lr_other",
                "distill.eval_blocks": None}
#: keys added after runs were recorded, with the default that reproduces the older behaviour: a saved config
#: that lacks one and a current one that holds this default are the same run
_ADDED_DEFAULTS = {"distill.stage1_batch_size": 0, "distill.stage1_micro_batch_size": 0}
_ALLOWED = "only learning rates, evaluators, distill.eval_every / eval_blocks and raised stage budgets can"


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two config trees differ (a whole subtree where one side lacks it)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".") or "config"]


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _checkpoints(out: Path, pattern: str) -> list[Path]:
    return sorted((out / "checkpoints").rglob(pattern)) if (out / "checkpoints").is_dir() else []


def _selection_unfinished(out: Path) -> bool:
    """Probe checkpoints exist and the final distillation has not started (no ``checkpoints/final`` file)."""
    final = out / "checkpoints" / "final"
    return bool(_checkpoints(out, "probes*.pt")) and not (final.is_dir() and any(final.glob("*.pt")))


def _why_not(key: str, old: Any, new: Any, saved: dict[str, Any], out: Path) -> str | None:
    """None when ``key`` may change from ``old`` to ``new`` under --resume, else the reason it may not."""
    if key in _PROBE_READS and _selection_unfinished(out):
        probe_key = _PROBE_READS[key]
        if probe_key is None or not _get(saved, f"selection.{probe_key}"):
            return f"{key} (the unfinished selection's probes use it)"
    if key == "evaluators" or key.startswith("evaluators.") or key in LR_KEYS or key in EVAL_KEYS:
        return None
    if key in BUDGET_KEYS:
        if not (isinstance(old, int) and isinstance(new, int) and new >= old):
            return f"{key} (lowered from {old!r} to {new!r}; a budget may only be raised)"
        started = [p.name for pat in _LATER[BUDGET_KEYS[key]] for p in _checkpoints(out, pat)]
        if started:
            return f"{key} (a later stage has started: {sorted(set(started))[0]})"
        return None
    return key


def check_resume_config(out: Path, config: dict[str, Any], *, teacher: str | None = None, finished_rows: int = 0) -> list[str]:
    """Record the config (and teacher fingerprint); on resume refuse changes that invalidate finished work.

    Returns:
        The accepted changes, as ``key: old -> new`` lines (also printed and appended to ``OUT/resumes.jsonl``).

    Raises:
        HybridizeError: naming the keys that may not change (or the teacher that changed).
    """
    path = out / RUN_CONFIG
    current = json.loads(json.dumps(config, default=str))
    check_teacher(out, teacher)
    if not path.exists():
        _write_json(path, current)
        return []
    saved = json.loads(path.read_text())
    keys = [k for k in diff_keys(saved, current)
            if not (k in _ADDED_DEFAULTS and _get(saved, k) is None and _get(current, k) == _ADDED_DEFAULTS[k])]
    refused = [why for k in keys if (why := (_why_not(k, _get(saved, k), _get(current, k), saved, out)
                                             if not finished_rows else k))]
    if refused:
        rows = f" ({finished_rows} compare row(s) already finished under the old config)" if finished_rows else ""
        raise HybridizeError(
            f"--resume of {str(out)!r} with a different config: {', '.join(refused[:5])} differ(s) from {str(path)!r}"
            f"{rows} and cannot change under --resume ({_ALLOWED}); resume with the same config and --set values, "
            "or use --overwrite / another --out"
        )
    changes = [f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}" for k in keys]
    if changes:
        print(f"hybridize: --resume of {str(out)!r} continues with changed settings: {'; '.join(changes)}", file=sys.stderr)
        with open(out / RESUMES, "a") as f:
            f.write(json.dumps({"changed": {k: [_get(saved, k), _get(current, k)] for k in keys}}) + "\n")
        _write_json(path, current)
    return changes


def _write_json(path: Path, payload: Any) -> None:
    from hybridize.atomic_io import write_json

    write_json(path, payload)


# -- the teacher's fingerprint --------------------------------------------------------------------
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_SAMPLES, _CHUNK = 16, 1 << 16


def _file_digest(path: Path) -> str:
    """sha256 of size, the safetensors header (names, dtypes, shapes, offsets) and 16 sampled 64 KiB chunks."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:
            h.update(f.read(min(int.from_bytes(head, "little"), 100 << 20)))
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _CHUNK) * i // max(1, _SAMPLES - 1)))
            h.update(f.read(_CHUNK))
    return h.hexdigest()


def teacher_fingerprint(teacher: str) -> dict[str, str] | None:
    """File name -> digest of a local teacher's weight files and config.json (None for a hub id).

    Cheap on purpose (about 1 MiB read per file, whatever its size): sizes, safetensors headers and
    sampled chunks. Another checkpoint at the same path (retrained, fine-tuned, converted) differs in
    them; copying or touching the files does not.
    """
    root = Path(teacher).expanduser()
    if not root.is_dir():
        return None
    files = sorted({p for pattern in (*_WEIGHTS, "config.json") for p in root.glob(pattern) if p.is_file()})
    return {p.name: _file_digest(p) for p in files}


def check_teacher(out: Path, teacher: str | None) -> None:
    """Record the teacher's fingerprint in ``OUT/teacher.json``; on resume refuse a different teacher.

    Raises:
        HybridizeError: naming the teacher and the files that changed.
    """
    if teacher is None:
        return
    found = teacher_fingerprint(teacher)
    path = out / TEACHER
    if not path.exists():
        _write_json(path, {"teacher": teacher, "method": "sha256 of size, safetensors header, 16 x 64 KiB samples",
                           "files": found})
        return
    saved = json.loads(path.read_text()).get("files")
    if saved is None or found is None or saved == found:
        return
    changed = sorted(n for n in set(saved) | set(found) if saved.get(n) != found.get(n))
    raise HybridizeError(
        f"--resume of {str(out)!r} refused: the teacher {teacher!r} is not the one this run started with (its "
        f"{', '.join(changed[:4])} changed since {str(path)!r} recorded it); put the original teacher back at that path, "
        "or start again with --overwrite / another --out"
    )
