"""Loading checkpoints, and the whole state of an FSDP2-sharded model for one.

Checkpoints are written by :func:`hybridize.atomic_io.atomic_torch_save` (a temporary file, its
hash recorded in the directory's manifest, an atomic rename) and read back here, verified first.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridize.atomic_io import IntegrityError, verify_checkpoint


def load_checkpoint(path: Path) -> Any:
    """Verify a checkpoint against its manifest, then load it with ``weights_only=True``.

    Raises:
        IntegrityError: the file has no manifest record, does not match it, or cannot be read.
    """
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise IntegrityError(
            f"checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: {exc}); delete that file to redo "
            "its stage, or start again with --overwrite"
        ) from exc


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str]) -> tuple[dict, dict]:
    """Whole tensors of ``names`` and the optimizer state of an FSDP2-sharded model (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    return {n: weights[n] for n in names if n in weights}, optim  # with cpu_offload only rank 0 gets the tensors


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load whole tensors and optimizer state (as :func:`full_state` gives them) into an FSDP2-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
