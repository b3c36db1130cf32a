"""The ``device`` setting: checked against this machine when the config is validated, before anything is written."""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_FORMS = "auto, cpu, cuda or cuda:N"  # mps is accepted too where torch has it (Apple GPUs)
_CUDA = re.compile(r"cuda(?::(\d+))?")


def _visible() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _available(count: int) -> str:
    cuda = ", cuda, " + ", ".join(f"cuda:{i}" for i in range(count)) if count else " only: torch sees no CUDA GPU"
    return f"this machine has cpu{cuda}{_visible()}"


RUN_FIX = "set device to one of those or auto (e.g. --set device={suggest})"


def device_problem(value: object, *, field: str = "run field 'device'", fix: str = RUN_FIX) -> str | None:
    """One line saying why ``value`` is not a device this machine can run on, or ``None`` when it is.

    Args:
        value: the user's setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        field: how the message names the setting.
        fix: how the user changes it; ``{suggest}`` becomes a device this machine has (``cpu``, ``cuda:0``).
    """
    if value in ("auto", "cpu") or (value == "mps" and _mps()):
        return None
    match = _CUDA.fullmatch(value) if isinstance(value, str) else None
    count = _gpus()
    fix = fix.format(suggest="cuda:0" if count else "cpu")
    if match is None:
        return f"{field} must be {_FORMS}; got {value!r} ({_available(count)}); {fix}"
    if count == 0 or (match.group(1) is not None and int(match.group(1)) >= count):
        return f"{field} must be a device this machine has; got {value!r} ({_available(count)}); {fix}"
    return None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
