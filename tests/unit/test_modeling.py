"""Saving and loading hybrids: save_pretrained, load_hybrid, AutoModelForCausalLM after import hybridize."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hybridize.errors import HybridizeError
from hybridize.atomic_io import write_manifest
from hybridize.model.hybrid import load_hybrid, save_hybrid
from hybridize.model.surgery import build_student
from hybridize.testing.models import FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(tmp_path, family):
    student = build_student(tiny_model(family, n_layer=3), [1], "gdn").eval()
    save_hybrid(student, tmp_path / "m", tiny_tokenizer())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == f"hybridize_{family}"
    assert cfg["hybridize"]["softmax_layers"] == [1] and cfg["hybridize"]["linear_layers"] == [0, 2]
    assert cfg["hybridize"]["variant"] == "gdn" and cfg["hybridize"]["plugin"]["distribution"] == "hybridize"
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    loaded = load_hybrid(tmp_path / "m").eval()
    ids = torch.randint(3, 64, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_auto_model_after_import_hybridize_in_either_order(tmp_path):
    student = build_student(tiny_model("qwen2", n_layer=2), [0], "gla").eval()
    save_hybrid(student, tmp_path / "m")
    ids = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        expected = student(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "x.pt")
    for first, second in (("hybridize", "transformers"), ("transformers", "hybridize")):
        code = (
            f"import {first}, {second}, torch\n"
            "torch.set_num_threads(1)\n"  # as the parent: bitwise equality needs the same reduction order
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}).eval()\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "with torch.no_grad(): print(type(m).__name__, torch.equal(m(x['ids']).logits, x['logits']))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == "HybridQwen2ForCausalLM True", out.stderr[-1500:]


def test_loading_a_plain_model_as_hybrid_is_refused(tmp_path):
    tiny_model("llama", n_layer=2).save_pretrained(tmp_path / "plain")
    with pytest.raises(HybridizeError, match="not a hybrid saved by hybridize"):
        load_hybrid(tmp_path / "plain")


def test_missing_variant_plugin_names_it(tmp_path):
    student = build_student(tiny_model("llama", n_layer=2), [0], "gdn")
    save_hybrid(student, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hybridize"]["variant"] = "fancy-attn"
    cfg["hybridize"]["plugin"] = {"distribution": "hybridize-fancy", "version": "2.0"}
    cfg_path.write_text(json.dumps(cfg))
    write_manifest(tmp_path / "m")  # as if saved where that plugin is installed
    with pytest.raises(HybridizeError, match="'fancy-attn' from hybridize-fancy 2.0, which is not installed"):
        load_hybrid(tmp_path / "m")


def test_auto_model_loads_the_hybrid_backbone_and_decodes_with_its_cache(tmp_path):
    from transformers import AutoModel

    from hybridize.model.cache import HybridCache, cache_arg_name

    student = build_student(tiny_model("llama", n_layer=3), [1], "gdn").eval()
    save_hybrid(student, tmp_path / "m")
    base = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert type(base).__name__ == "HybridLlamaModel"
    ids = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    name = cache_arg_name(type(base).forward)
    with torch.no_grad():
        full = base(ids).last_hidden_state
        torch.testing.assert_close(full, student.model(ids).last_hidden_state)
        first = base(ids[:, :6])  # config.use_cache: the backbone makes a HybridCache, as the teacher's makes a DynamicCache
        assert isinstance(getattr(first, name), HybridCache)
        step = base(ids[:, 6:], **{name: getattr(first, name)}).last_hidden_state
    torch.testing.assert_close(step[:, -1], full[:, -1])


def test_auto_model_from_pretrained_verifies_the_manifest(tmp_path):
    """A damaged saved hybrid is refused by name through AutoModelForCausalLM too, as load_hybrid refuses it."""
    from transformers import AutoModelForCausalLM

    from hybridize.atomic_io import MANIFEST, IntegrityError, sha256_file

    save_hybrid(build_student(tiny_model("llama", n_layer=2), [0], "gdn"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    recorded = json.loads((tmp_path / "m" / MANIFEST).read_text())["files"]["model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64  # same size, damaged tensor bytes (loaded, they give inf / NaN logits)
    weights.write_bytes(bytes(data))
    fix = "save it again with hybridize.save_hybrid (or rerun the run with --resume)"
    with pytest.raises(IntegrityError) as exc:
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert str(exc.value) == (
        f"saved hybrid {str(tmp_path / 'm')!r} is damaged: file 'model.safetensors' has {len(data)} bytes and sha256 "
        f"{sha256_file(weights)[:12]}..., but {MANIFEST} records {recorded['bytes']} bytes and sha256 {recorded['sha256'][:12]}...; {fix}")
    (tmp_path / "m" / MANIFEST).unlink()
    with pytest.raises(IntegrityError) as exc:
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert str(exc.value) == (f"saved hybrid {str(tmp_path / 'm')!r} has no {MANIFEST}: its save did not finish (or it was not "
                              f"written by hybridize); {fix}")


def test_load_hybrid_hashes_the_directory_once(tmp_path, monkeypatch):
    from hybridize import atomic_io as integrity

    save_hybrid(build_student(tiny_model("llama", n_layer=2), [0], "gdn"), tmp_path / "m")
    calls = []
    monkeypatch.setattr(integrity, "sha256_file", lambda p, _f=integrity.sha256_file: calls.append(p) or _f(p))
    load_hybrid(tmp_path / "m")
    assert sorted(calls) == sorted(set(calls))  # from_pretrained does not verify again what load_hybrid just verified
