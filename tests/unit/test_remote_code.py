"""Saved hybrids load with stock transformers (``trust_remote_code``) and compute what hybridize's classes do.

``save_hybrid`` writes ``modeling_hybridize.py`` and ``linear_hybridize.py`` beside the weights and an
``auto_map`` into ``config.json``. These tests are the guard against the two implementations drifting apart:
the stock-tools module must know exactly the plugins' options and give the same logits, padded logits and
greedy tokens (cache on) on every supported family and on each option that changes the computation.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from hybridize.model import linear_hybridize, modeling_hybridize
from hybridize.model.hybrid import REMOTE_CODE, load_hybrid, save_hybrid, stock_auto_map
from hybridize.model.surgery import build_student
from hybridize.plugins.linear_attn.gdn import GDNConfig
from hybridize.plugins.linear_attn.gla import GLAConfig
from hybridize.registry.configs import config_to_dict
from hybridize.testing.models import FAMILIES, ToyVariantPlugin, tiny_model, tiny_tokenizer

from conftest import run_without_hybridize

#: each option that changes what a layer computes, away from its default at least once
CASES = {
    "gdn": ("gdn", {}),
    "gdn-noconv-nogate-negeig-eps": ("gdn", {"use_short_conv": False, "use_gate": False, "allow_neg_eigval": True,
                                             "norm_eps": 1e-3, "chunk_size": 16}),
    "gdn-conv2-noact-noqknorm": ("gdn", {"conv_size": 2, "conv_activation": "none", "qk_norm": False}),
    "gla": ("gla", {}),
    "gla-conv-nogate-rank4": ("gla", {"use_short_conv": True, "use_output_gate": False, "gate_low_rank_dim": 4,
                                      "gate_logit_normalizer": 4.0, "chunk_size": 7}),
    "gla-noact-conv": ("gla", {"use_short_conv": True, "conv_activation": "none"}),
}


def test_the_module_knows_exactly_the_plugins_options():
    assert linear_hybridize.OPTIONS["gdn"] == config_to_dict(GDNConfig())
    assert linear_hybridize.OPTIONS["gla"] == config_to_dict(GLAConfig())
    assert set(linear_hybridize.LAYERS) == set(linear_hybridize.OPTIONS)


def _saved(tmp_path, family, variant, params, *, softmax=(1,), seed=0):
    student = build_student(tiny_model(family, n_layer=3, seed=seed), list(softmax), variant, params).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # off the teacher's init: gates, convolutions and norms all non-trivial
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_hybrid(student, tmp_path / f"{family}-{variant}", tiny_tokenizer())


def _stock(path):
    names = json.loads((path / "config.json").read_text())["auto_map"]
    module, cls = names["AutoModelForCausalLM"].split(".")
    assert module == "modeling_hybridize" and names["AutoConfig"].startswith("modeling_hybridize.")
    return getattr(modeling_hybridize, cls).from_pretrained(path).eval()


def _close(a, b, what):
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what}: max |diff| {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_stock_module_equals_hybridize(tmp_path, family, case):
    path = _saved(tmp_path, family, *CASES[case])
    assert set(REMOTE_CODE) <= {p.name for p in path.iterdir()}
    ours, stock = load_hybrid(path).eval(), _stock(path)
    assert type(stock).__module__ == modeling_hybridize.__name__
    assert isinstance(stock.model.layers[0].self_attn, linear_hybridize.LinearLayer)
    ids = torch.randint(3, 64, (2, 70), generator=torch.Generator().manual_seed(1))  # > one GDN chunk of 64
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding in row 0
    with torch.no_grad():
        _close(stock(ids).logits, ours(ids).logits, "logits")
        real = mask.bool()
        _close(stock(ids, attention_mask=mask).logits[real], ours(ids, attention_mask=mask).logits[real], "padded logits")
    kw = dict(attention_mask=mask[:, :10], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(stock.generate(ids[:, :10], **kw), ours.generate(ids[:, :10], **kw))


def test_stock_module_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match=r"option\(s\) \['new_option'\]"):
        linear_hybridize.options("gdn", {"new_option": 1})
    with pytest.raises(ValueError, match="linear attention 'toy-cumsum'"):
        linear_hybridize.options("toy-cumsum", {})


def test_no_auto_map_for_a_variant_the_module_does_not_run(tmp_path, hybridize_pm):
    hybridize_pm.register(ToyVariantPlugin(), name="toy")
    student = build_student(tiny_model("llama", n_layer=2), [1], "toy-cumsum", pm=hybridize_pm)
    assert stock_auto_map(student.config) is None
    path = save_hybrid(student, tmp_path / "toy")
    assert "auto_map" not in json.loads((path / "config.json").read_text())
    assert not any((path / name).exists() for name in REMOTE_CODE)


def test_a_saved_hybrid_loads_and_generates_without_hybridize(tmp_path):
    path = _saved(tmp_path, "qwen3", "gdn", {})
    ours = load_hybrid(path).eval()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours(ids).logits
    greedy = ours.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "ids = torch.tensor(eval(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    logits = m(ids).logits\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)\n"
        "torch.save({'logits': logits, 'greedy': out, 'cls': type(m).__name__,\n"
        "            'hybridize': sorted(n for n in sys.modules if n.split('.')[0] == 'hybridize')}, sys.argv[3])\n"
    )
    result = tmp_path / "stock.pt"
    proc = run_without_hybridize([sys.executable, "-c", code, str(path), repr(ids.tolist()), str(result)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result, weights_only=True)
    assert got["cls"] == "HybridizeQwen3ForCausalLM" and got["hybridize"] == []
    _close(got["logits"], logits, "logits without hybridize")
    assert torch.equal(got["greedy"], greedy)


def test_without_hybridize_an_import_of_it_fails(tmp_path):
    proc = run_without_hybridize([sys.executable, "-c", "import hybridize"], tmp_path)
    assert proc.returncode != 0 and "hybridize is blocked" in proc.stderr


def test_stock_cache_refuses_a_plain_dynamic_cache(tmp_path):
    from transformers import DynamicCache

    stock = _stock(_saved(tmp_path, "llama", "gdn", {}))
    name = modeling_hybridize._cache_name(type(stock).forward)  # cache (transformers >= 5.24) or past_key_values
    with pytest.raises(ValueError, match="holds no\\s+recurrent state"):
        stock(torch.tensor([[3, 4, 5]]), use_cache=True, **{name: DynamicCache()})
