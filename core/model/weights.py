"""The stored weights of a model directory, read from safetensors headers only (no tensor is loaded).

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every
tensor with its dtype, shape and byte range; the byte ranges must end exactly where the file does.
That is enough to refuse, before any weights load and before anything is written, a truncated or
garbage file (naming it), a pickle-only directory, and a ``config.json`` that does not match its
weights (more layers declared than stored, other shapes): transformers would initialise the missing
tensors randomly and carry on.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hybridize.errors import HybridizeError

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound on the header
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def safetensors_files(directory: Path, what: str) -> list[Path]:
    """The safetensors files of a local model directory (the shards its index names, else every file).

    Raises:
        HybridizeError: no safetensors file (naming the pickle files when those are all it holds), or an
            index that names a missing shard.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise HybridizeError(f"{what}: {str(index)!r} is not a valid safetensors index ({exc}); save the model again") from exc
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise HybridizeError(f"{what}: {str(index)!r} names shard {missing[0]!r}, which is missing "
                                 f"({len(missing)} of {len(shards)} shards missing); copy the whole model directory")
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pattern in _PICKLES for p in directory.glob(pattern))
    if pickles:
        raise HybridizeError(
            f"{what} holds its weights only in pickle file(s) {', '.join(pickles)}; hybridize reads weights only from "
            "safetensors files. Convert the checkpoint once (from_pretrained(...).save_pretrained(dir, "
            "safe_serialization=True)) and pass that directory"
        )
    raise HybridizeError(f"{what} has no weights (no *.safetensors file); pass a model directory saved with save_pretrained")


def read_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` from one safetensors file's header; checks that the file is complete.

    Raises:
        HybridizeError: naming the file, when it is truncated or not a safetensors file.
    """
    size = path.stat().st_size
    bad = f"{what}: weights file {str(path)!r} ({size} bytes)"
    fix = "copy or download that file again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise HybridizeError(f"{bad} is not a safetensors file or is truncated (its header length is unreadable); {fix}")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            ends = [int(v["data_offsets"][1]) for v in tensors.values()]
            out = {k: (str(v["dtype"]), tuple(int(s) for s in v["shape"])) for k, v in tensors.items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise HybridizeError(f"{bad} is not a safetensors file: its header is not valid ({type(exc).__name__}); {fix}") from exc
    data = size - 8 - n
    if max(ends, default=0) != data:
        raise HybridizeError(f"{bad} is truncated or damaged: its header describes {max(ends, default=0)} bytes of tensor "
                             f"data but the file holds {data}; {fix}")
    return out


def stored_tensors(directory: Path, what: str) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor stored in a model directory's safetensors files."""
    out: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(directory, what):
        out.update({k: shape for k, (_, shape) in read_header(path, what).items()})
    return out


def expected_tensors(config: Any) -> list[tuple[list[str], tuple[int, ...]]]:
    """What a config's model holds: ``([name, aliases...], shape)`` per tensor, tied ones grouped (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[int, tuple[list[str], tuple[int, ...]]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), ([], tuple(t.shape)))[0].append(name)
    return list(groups.values())


def _extra_layers(stored: Iterable[str], n_layers: int) -> list[int]:
    return sorted({int(m.group(1)) for k in stored if (m := _LAYER.match(k)) and int(m.group(1)) >= n_layers})


def check_weights_match_config(directory: Path, config: Any, what: str) -> None:
    """Refuse a model directory whose stored tensors do not match its config (names and shapes).

    Raises:
        HybridizeError: naming the count and the first missing tensor, the first shape that differs, or
            layers stored beyond ``num_hidden_layers``.
    """
    stored = stored_tensors(directory, what)
    if stored and not any(k.startswith("model.") for k in stored):  # weights saved from the base model
        stored = {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in stored.items()}
    expected = expected_tensors(config)
    n_layers = getattr(config, "num_hidden_layers", None)
    missing = [names[0] for names, _ in expected if not any(n in stored for n in names) and not _IGNORED.search(names[0])]
    if missing:
        raise HybridizeError(
            f"{what}: its config.json (num_hidden_layers={n_layers}) declares {len(missing)} tensor(s) that its safetensors "
            f"weights do not hold, the first {missing[0]!r}; transformers would initialise them randomly. Fix config.json "
            "to match the weights, or use the complete checkpoint"
        )
    for names, shape in expected:
        name = next(n for n in names if n in stored) if any(n in stored for n in names) else None
        if name is not None and stored[name] != shape:
            raise HybridizeError(f"{what}: tensor {name!r} is stored with shape {list(stored[name])} but config.json gives "
                                 f"{list(shape)}; fix config.json to match the weights, or use the checkpoint it belongs to")
    extra = _extra_layers(stored, n_layers or 0)
    if extra:
        raise HybridizeError(f"{what}: its safetensors weights hold layer(s) {extra} beyond config.json's num_hidden_layers="
                             f"{n_layers}; transformers would drop them. Fix num_hidden_layers, or use the checkpoint it belongs to")
