"""Surgery on a real pretrained teacher (stories260K, a 5-layer Llama) with real tokenized text."""
from __future__ import annotations

import warnings

import pytest
import torch

from hybridize.registry.manager import get_plugin_manager
from hybridize.model.surgery import build_student, linear_layers
from hybridize.model.teacher import Teacher, load_teacher

from conftest import shared_path  # tests/conftest.py: $HYBRIDIZE_SHARED or ../shared, skips when absent


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return load_teacher(shared_path("teachers", "stories260K", "config.json").parent)


@pytest.fixture(scope="module")
def batch(teacher) -> torch.Tensor:
    """Two rows of 64 real tokens from the TinyStories validation text."""
    TEXT = shared_path("data", "tinystories_val.txt")
    ids = teacher.tokenizer(TEXT.read_text(encoding="utf-8")[:1_000], return_tensors="pt").input_ids[0]
    return ids[: 2 * 64].reshape(2, 64)


def _variant(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry = get_plugin_manager(skip_broken=True).registry("linear_attention")
    if name not in registry:
        pytest.skip(f"linear-attention variant {name!r} is not installed yet")
    return registry[name]


def test_teacher_loads_frozen_with_its_tokenizer(teacher, batch):
    assert type(teacher.model).__name__ == "LlamaForCausalLM" and len(teacher.model.model.layers) == 5
    assert teacher.tokenizer is not None and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert batch.shape == (2, 64) and int(batch.max()) < teacher.model.config.vocab_size


@pytest.mark.parametrize("name", ["gdn", "gla"])
def test_all_linear_student_runs_on_real_text(teacher, batch, name):
    student = build_student(teacher, [], _variant(name))
    assert linear_layers(student) == [0, 1, 2, 3, 4]
    out = student(batch, labels=batch, use_cache=False)
    assert out.logits.shape == (2, 64, 512) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


@pytest.mark.parametrize("name", ["gdn", "gla"])
def test_all_softmax_student_equals_teacher(teacher, batch, name):
    student = build_student(teacher, [0, 1, 2, 3, 4], _variant(name))
    with torch.no_grad():
        assert torch.equal(student(batch, use_cache=False).logits, teacher.model(batch, use_cache=False).logits)
    assert student.config.hybridize["variant"] == name
    assert student.config.hybridize["plugin"]["distribution"] == "hybridize"


@pytest.mark.parametrize("name", ["gdn", "gla"])
def test_left_padded_real_text_equals_unpadded(teacher, batch, name):
    student = build_student(teacher, [2], _variant(name))
    short = batch[1, :40]
    ids = torch.stack([batch[0], torch.cat([torch.zeros(24, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :24] = 0
    with torch.no_grad():
        padded = student(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)
        alone = student(short[None], use_cache=False)
    torch.testing.assert_close(padded.logits[1, 24:], alone.logits[0], rtol=1e-4, atol=1e-3)
