"""Weights come only from safetensors; every torch file is loaded with weights_only=True (no unpickling of code)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from hybridize.errors import HybridizeError
from hybridize.model.teacher import load_teacher
from hybridize.testing.models import save_tiny_teacher

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("core", "plugins", "tests", "bench", "scripts", "configs") if (ROOT / d).is_dir()
                 for p in (ROOT / d).rglob("*.py"))


def _calls(tree: ast.AST, dotted: str):
    mod, attr = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            if isinstance(node.func.value, ast.Name) and node.func.value.id == mod:
                yield node


def _weights_only_true(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_the_scan_sees_the_sources():
    assert any(p.name == "loop.py" for p in SOURCES) and len(SOURCES) > 20


def test_every_torch_load_passes_weights_only_true():
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        bad += [f"{path.relative_to(ROOT)}:{c.lineno}" for c in _calls(tree, "torch.load") if not _weights_only_true(c)]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_the_library_never_unpickles():
    bad = []
    for path in SOURCES:
        if path.relative_to(ROOT).parts[0] in ("core", "plugins"):
            tree = ast.parse(path.read_text())
            bad += [f"{path.relative_to(ROOT)}:{c.lineno}" for name in ("pickle.load", "pickle.loads") for c in _calls(tree, name)]
    assert not bad, bad


def test_a_teacher_with_only_pickled_weights_is_refused(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "t", n_layer=1)
    from safetensors.torch import load_file

    torch.save(load_file(teacher / "model.safetensors"), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()
    with pytest.raises(HybridizeError) as exc:
        load_teacher(teacher)
    assert str(exc.value) == (
        f"teacher {str(teacher)!r} holds its weights only in pickle file(s) pytorch_model.bin; hybridize reads weights only "
        "from safetensors files. Convert the checkpoint once (from_pretrained(...).save_pretrained(dir, "
        "safe_serialization=True)) and pass that directory"
    )
