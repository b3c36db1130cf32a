"""Teacher loading and reading: supported families, attention specs and weights, tiny models."""
from __future__ import annotations

import re

import pytest
import torch

from hybridize.errors import HybridizeError, UnsupportedArchitectureError
from hybridize.linear import AttentionSpec
from hybridize.model.teacher import (
    SUPPORTED_ARCHITECTURES,
    attention_spec,
    check_supported,
    load_teacher,
    teacher_attention_weights,
)
from hybridize.testing.models import FAMILIES, tiny_config, tiny_model

SUPPORTED = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"]


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))


def assert_lists_supported(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert all(name in msg for name in SUPPORTED), msg
    assert "Use a checkpoint of one of these families" in msg


def test_supported_architectures_are_the_four_families():
    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(SUPPORTED)
    assert SUPPORTED_ARCHITECTURES["Qwen3ForCausalLM"].q_norm == "q_norm"


@pytest.mark.parametrize("family", FAMILIES)
def test_check_supported_accepts_each_family(family):
    assert check_supported(tiny_model(family, n_layer=1)).family == family


def test_check_supported_refuses_gpt2():
    with pytest.raises(UnsupportedArchitectureError) as exc:
        check_supported(tiny_gpt2())
    assert "GPT2LMHeadModel (model_type 'gpt2')" in str(exc.value)
    assert_lists_supported(exc)


@pytest.mark.parametrize(
    ("family", "overrides", "expected"),
    [
        ("llama", {}, dict(head_dim=8, q_bias=False, o_bias=False, qk_norm=False)),
        ("llama", {"attention_bias": True}, dict(q_bias=True, k_bias=True, v_bias=True, o_bias=True)),
        ("qwen2", {}, dict(head_dim=8, q_bias=True, k_bias=True, v_bias=True, o_bias=False)),
        ("qwen3", {}, dict(head_dim=16, q_bias=False, qk_norm=True)),
        ("mistral", {}, dict(head_dim=8, q_bias=False, qk_norm=False)),
    ],
)
def test_attention_spec(family, overrides, expected):
    model = tiny_model(family, n_layer=2, **overrides)
    spec = attention_spec(model, 1)
    assert isinstance(spec, AttentionSpec)
    assert (spec.layer_idx, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (1, 32, 4, 2)
    assert spec.kv_groups == 2
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


def test_attention_spec_layer_out_of_range():
    with pytest.raises(HybridizeError, match=r"field 'layer_idx' must be an int in \[0, 2\); got 2"):
        attention_spec(tiny_model(n_layer=2), 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_attention_weights_are_detached_clones(family):
    model = tiny_model(family, n_layer=2)
    attn = model.model.layers[0].self_attn
    w = teacher_attention_weights(model, 0)
    pairs = [(w.q_weight, attn.q_proj.weight), (w.k_weight, attn.k_proj.weight), (w.v_weight, attn.v_proj.weight),
             (w.o_weight, attn.o_proj.weight), (w.q_bias, attn.q_proj.bias), (w.k_bias, attn.k_proj.bias),
             (w.v_bias, attn.v_proj.bias), (w.o_bias, attn.o_proj.bias),
             (w.q_norm, getattr(getattr(attn, "q_norm", None), "weight", None)),
             (w.k_norm, getattr(getattr(attn, "k_norm", None), "weight", None))]
    for mine, theirs in pairs:
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.equal(mine, theirs) and not mine.requires_grad
            assert mine.untyped_storage().data_ptr() != theirs.untyped_storage().data_ptr()
    before = attn.k_proj.weight.clone()
    w.k_weight.add_(1.0)
    assert torch.equal(attn.k_proj.weight, before)


def test_qwen3_norm_weights_are_read():
    w = teacher_attention_weights(tiny_model("qwen3", n_layer=1), 0)
    assert w.q_norm.shape == (16,) and w.k_norm.shape == (16,)
    assert not torch.equal(w.q_norm, torch.ones(16))


# -- tiny models -------------------------------------------------------------------------------
def test_tiny_model_is_deterministic_and_leaves_the_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pc["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_randomises_biases_and_norms(family):
    model = tiny_model(family, n_layer=1, attention_bias=True) if family == "llama" else tiny_model(family, n_layer=1)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert p.abs().min() > 0, name
        elif "norm" in name:
            assert not torch.equal(p, torch.ones_like(p)), name


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="field 'family' must be one of llama, qwen2, qwen3, mistral; got 'gpt2'"):
        tiny_config("gpt2")


# -- load_teacher ------------------------------------------------------------------------------
def test_load_teacher_from_a_local_dir(tmp_path):
    model = tiny_model("qwen3", n_layer=2)
    model.save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path)
    assert teacher.path == str(tmp_path) and teacher.tokenizer is None
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher.model(ids).logits, model(ids).logits)


def test_load_teacher_dtype(tmp_path):
    tiny_model(n_layer=1).save_pretrained(tmp_path)
    assert load_teacher(tmp_path, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_load_teacher_refuses_an_unsupported_checkpoint_before_loading_weights(tmp_path):
    config = tiny_gpt2().config
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)  # config only: loading weights would fail differently
    with pytest.raises(UnsupportedArchitectureError) as exc:
        load_teacher(tmp_path)
    assert f"teacher '{tmp_path}' is a GPT2LMHeadModel (model_type 'gpt2'); hybridize supports: " in str(exc.value)
    assert_lists_supported(exc)


def test_load_teacher_without_architectures_uses_model_type(tmp_path):
    config = tiny_gpt2().config
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2'"):
        load_teacher(tmp_path)


def test_load_teacher_refuses_a_non_causal_lm_head(tmp_path):
    config = tiny_config("llama", n_layer=1)
    config.architectures = ["LlamaForSequenceClassification"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        load_teacher(tmp_path)


def test_load_teacher_missing_local_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(HybridizeError, match=re.escape(f"teacher path '{missing}' does not exist")):
        load_teacher(missing)
