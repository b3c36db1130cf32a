"""Surgery: students built from tiny teachers of every family, with the toy and the real variants."""
from __future__ import annotations

import warnings

import pytest
import torch

from hybridize.errors import ConfigError, PluginReturnError, UnknownComponentError, UnsupportedArchitectureError
from hybridize.linear import PADDING_MASK, LinearAttention
from hybridize.registry.manager import HybridizePluginManager, get_plugin_manager
from hybridize.model.padding import install_padding_hook
from hybridize.model.surgery import build_student, linear_layers, softmax_layers
from hybridize.testing.models import FAMILIES, CumsumConfig, ToyVariantPlugin, tiny_model

TOY = "toy-cumsum"


def _toy_pm() -> HybridizePluginManager:
    pm = HybridizePluginManager()
    pm.register(ToyVariantPlugin())
    return pm


def _installed_variants() -> dict:
    """The installed linear-attention variants (gdn, gla, ...); broken or missing plugins are left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(get_plugin_manager(skip_broken=True).registry("linear_attention"))


INSTALLED = _installed_variants()
ENTRIES = {TOY: _toy_pm().registry("linear_attention")[TOY], **INSTALLED}
VARIANTS = sorted(ENTRIES)


@pytest.fixture
def toy_pm() -> HybridizePluginManager:
    return _toy_pm()


def _ids(B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


# -- exactness and training -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_all_softmax_student_equals_teacher(family, toy_pm):
    teacher = tiny_model(family)
    student = build_student(teacher, [0, 1, 2, 3], TOY, pm=toy_pm)
    ids, mask = _ids(), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    assert torch.equal(_logits(student, ids), _logits(teacher, ids))
    assert torch.equal(_logits(student, ids, attention_mask=mask), _logits(teacher, ids, attention_mask=mask))
    assert linear_layers(student) == [] and softmax_layers(student) == [0, 1, 2, 3]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_student_forward_backward(family, variant):
    teacher = tiny_model(family)
    student = build_student(teacher, (2, 0), ENTRIES[variant])
    assert linear_layers(student) == [1, 3] and softmax_layers(student) == [0, 2]
    assert all(p.requires_grad for p in student.parameters())
    logits = student(_ids(), use_cache=False).logits
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in student.model.layers[1].self_attn.parameters())


def test_student_records_its_hybrid_config(toy_pm):
    student = build_student(tiny_model(), [3, 1], TOY, {"eps": 1e-5}, pm=toy_pm)
    assert student.config.hybridize == {
        "softmax_layers": [1, 3],
        "linear_layers": [0, 2],
        "variant": TOY,
        "variant_params": {"eps": 1e-5},
        "plugin": {"distribution": None, "version": None},
    }
    assert student.model.layers[0].self_attn.config == CumsumConfig(eps=1e-5)
    assert "hybridize" in student.config.to_dict()


def test_student_keeps_the_teacher_mode_dtype_and_device(toy_pm):
    teacher = tiny_model(n_layer=2).to(torch.bfloat16)
    student = build_student(teacher, [], TOY, pm=toy_pm)
    attn = student.model.layers[0].self_attn
    assert not attn.training and not student.training
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert {p.device for p in student.parameters()} == {teacher.device}


# -- weight transfer ---------------------------------------------------------------------------
def _heads(w: torch.Tensor, D: int) -> list[torch.Tensor]:
    return list(w.split(D, dim=0))


def _check_gqa_rows(mine: torch.Tensor, theirs: torch.Tensor, spec, label: str) -> None:
    """Query head j of ``mine`` equals KV head j // groups of ``theirs`` (or both are the KV layout)."""
    if mine.shape[0] == theirs.shape[0]:  # the variant keeps the KV layout
        assert torch.equal(mine, theirs), label
        return
    assert mine.shape[0] == spec.qk_dim, f"{label}: {tuple(mine.shape)} rows is neither Hkv*D nor H*D"
    ours, kv = _heads(mine, spec.head_dim), _heads(theirs, spec.head_dim)
    for j in range(spec.num_heads):
        assert torch.equal(ours[j], kv[j // spec.kv_groups]), f"{label}: query head {j}"


def _projections(attn) -> dict:
    out = {n: getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if not all(isinstance(m, torch.nn.Linear) for m in out.values()):
        pytest.skip(f"{type(attn).__name__} does not keep q/k/v/o_proj as nn.Linear; its own tests check the transfer")
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("family", "overrides"), [("llama", {"attention_bias": True}), ("qwen2", {}), ("qwen3", {}), ("mistral", {})])
def test_gqa_mapping_head_by_head_with_biases(family, overrides, variant):
    teacher = tiny_model(family, heads=4, kv_heads=2, **overrides)
    student = build_student(teacher, [1], ENTRIES[variant])
    for i in linear_layers(student):
        t, s = teacher.model.layers[i].self_attn, _projections(student.model.layers[i].self_attn)
        spec = student.model.layers[i].self_attn.spec
        assert torch.equal(s["q_proj"].weight, t.q_proj.weight) and torch.equal(s["o_proj"].weight, t.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            _check_gqa_rows(s[name].weight, getattr(t, name).weight, spec, f"layer {i} {name}.weight")
            if getattr(t, name).bias is not None:
                _check_gqa_rows(s[name].bias, getattr(t, name).bias, spec, f"layer {i} {name}.bias")
        for name in ("q_proj", "o_proj"):
            if getattr(t, name).bias is not None:
                assert torch.equal(s[name].bias, getattr(t, name).bias), f"layer {i} {name}.bias"


@pytest.mark.parametrize("variant", VARIANTS)
def test_qwen2_biases_are_carried(variant):
    teacher = tiny_model("qwen2", n_layer=2)
    attn = _projections(build_student(teacher, [], ENTRIES[variant]).model.layers[1].self_attn)
    t = teacher.model.layers[1].self_attn
    assert attn["q_proj"].bias is not None and torch.equal(attn["q_proj"].bias, t.q_proj.bias)
    assert attn["k_proj"].bias is not None and attn["v_proj"].bias is not None
    assert attn["o_proj"].bias is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_qwen3_norms_are_carried(variant):
    teacher = tiny_model("qwen3", n_layer=2)
    attn = build_student(teacher, [], ENTRIES[variant]).model.layers[0].self_attn
    t = teacher.model.layers[0].self_attn
    assert attn.spec.head_dim == 16 and attn.spec.qk_norm
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is None or getattr(norm, "weight", None) is None:
            pytest.skip(f"{type(attn).__name__} has no {name}.weight; its own tests check the norm transfer")
        assert torch.equal(norm.weight, getattr(t, name).weight), name


# -- the teacher is never touched --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_bit_identical_and_shares_no_storage(family):
    teacher = tiny_model(family).requires_grad_(False)
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    types = [type(m) for m in teacher.modules()]
    students = [build_student(teacher, layers, ENTRIES[v]) for v in VARIANTS for layers in ([], [1, 2])]
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert [type(m) for m in teacher.modules()] == types and not hasattr(teacher.config, "hybridize")
    assert not teacher.model._forward_pre_hooks and not teacher.model._forward_hooks
    ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    for student in students:
        assert ptrs.isdisjoint(p.untyped_storage().data_ptr() for p in student.parameters())


# -- errors ----------------------------------------------------------------------------------------
def test_unsupported_teacher(toy_pm):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedArchitectureError) as exc:
        build_student(gpt2, [], TOY, pm=toy_pm)
    msg = str(exc.value)
    assert "GPT2LMHeadModel (model_type 'gpt2')" in msg
    assert "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM" in msg


@pytest.mark.parametrize("bad", [2, "0,1", None, [0, 4], [-1], [1, 1], [0, "1"], [True], [0.0]])
def test_bad_softmax_layers(bad, toy_pm):
    with pytest.raises(ConfigError) as exc:
        build_student(tiny_model(), bad, TOY, pm=toy_pm)
    msg = str(exc.value)
    assert "build_student field 'softmax_layers' must" in msg, msg
    assert f"got {bad!r}" in msg and "0 <= i < 4 (the teacher has 4 layers)" in msg, msg


def test_bad_softmax_layers_collects_problems(toy_pm):
    with pytest.raises(ConfigError) as exc:
        build_student(tiny_model(), [5, 5], TOY, pm=toy_pm)
    assert len(exc.value.problems) == 2 and "out of range: [5, 5]" in str(exc.value) and "repeated: [5]" in str(exc.value)


def test_unknown_variant_did_you_mean(toy_pm):
    with pytest.raises(UnknownComponentError, match=r"Unknown linear attention 'toy-cumsun'\. Did you mean: toy-cumsum\?"):
        build_student(tiny_model(), [], "toy-cumsun", pm=toy_pm)


@pytest.mark.parametrize(("params", "text"), [({"epsilon": 1.0}, "has no field 'epsilon'"), ({"eps": "x"}, "field 'eps' must be float")])
def test_bad_variant_params(params, text, toy_pm):
    with pytest.raises(ConfigError, match=text):
        build_student(tiny_model(), [], TOY, params, pm=toy_pm)


def test_factory_must_return_a_linear_attention():
    from hybridize import hookimpl

    class Broken:
        @hookimpl
        def hybridize_register_linear_attention(self, register):
            register("broken", lambda spec, config: torch.nn.Identity(), CumsumConfig)

    pm = HybridizePluginManager()
    pm.register(Broken())
    with pytest.raises(PluginReturnError, match="returned a Identity; expected a subclass of hybridize.LinearAttention"):
        build_student(tiny_model(), [], "broken", pm=pm)


# -- the padding hook --------------------------------------------------------------------------
def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("variant", sorted({TOY, "gdn", "gla", *INSTALLED}))
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(family, variant):
    if variant not in ENTRIES:
        pytest.skip(f"variant {variant!r} is not installed yet")
    student = build_student(tiny_model(family), [1], ENTRIES[variant])
    rows = [_ids(1, 10, seed=1)[0], _ids(1, 6, seed=2)[0], _ids(1, 3, seed=3)[0]]
    ids, mask = _left_pad(rows)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    batch = _logits(student, ids, attention_mask=mask, position_ids=position_ids)
    for b, row in enumerate(rows):
        alone = _logits(student, row[None])[0]
        torch.testing.assert_close(batch[b, -len(row):], alone, rtol=1e-4, atol=1e-4, msg=f"row {b}")
    assert PADDING_MASK.get() is None


def test_padding_mask_is_seen_and_reset_even_on_error(toy_pm):
    student = build_student(tiny_model(n_layer=2), [], TOY, pm=toy_pm)
    seen = []
    orig = LinearAttention.forward

    def spy(self, hidden_states, *args, **kwargs):
        seen.append(PADDING_MASK.get())
        if len(seen) == 3:
            raise RuntimeError("boom")
        return orig(self, hidden_states, *args, **kwargs)

    mask = torch.tensor([[0, 1, 1]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(student.model.layers[0].self_attn), "forward", spy)
        student(torch.tensor([[1, 2, 3]]), attention_mask=mask, use_cache=False)
        with pytest.raises(RuntimeError, match="boom"):
            student(torch.tensor([[1, 2, 3]]), use_cache=False)
    assert seen[0] is mask and seen[1] is mask and seen[2] is None
    assert PADDING_MASK.get() is None


def test_install_padding_hook_is_idempotent(toy_pm):
    student = build_student(tiny_model(n_layer=1), [], TOY, pm=toy_pm)
    install_padding_hook(student)
    install_padding_hook(student)
    # two pre-hooks (the cache guard, the padding mask) and one hook, however often it is called
    assert len(student.model._forward_pre_hooks) == 2 and len(student.model._forward_hooks) == 1
