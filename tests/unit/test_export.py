"""``hybridize export``: the exporter registry and its conformance, the qwen3_5 layout, refusals, the out directory.

The acceptance case: a GDN hybrid of a random Qwen3 teacher (every norm weight random) exports to a directory
that stock transformers loads as ``Qwen3_5ForCausalLM`` with hybridize unimportable, with the hybrid's logits
(float32, within 1e-4) and greedy tokens (cache on).
"""
from __future__ import annotations

import json
import sys

import attrs
import pytest
import torch

from hybridize import hookimpl
from hybridize.cli import main
from hybridize.errors import ConfigError, ExportError
from hybridize.export import ExportCheck
from hybridize.model.export import REPORT
from hybridize.model.hybrid import save_hybrid
from hybridize.plugins.exporters import qwen3_5
from hybridize.plugins.linear_attn.gdn import GDNConfig
from hybridize.recipes.export import ExportOptions, export
from hybridize.registry.manager import get_plugin_manager
from hybridize.testing.exporters import check_exporter, exportable_hybrid
from hybridize.testing.models import FAMILIES, tiny_tokenizer

from conftest import run_without_hybridize

EXPORTERS = sorted(get_plugin_manager().registry("exporter"))
needs_qwen3_5 = pytest.mark.skipif(qwen3_5.Qwen35Exporter(qwen3_5.Qwen35ExportConfig()).unavailable() is not None,
                                   reason="this transformers does not ship qwen3_5 (Qwen3_5ForCausalLM)")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", EXPORTERS)
def test_exporter_conformance(pm, name, family):
    outcome = check_exporter(pm.registry("exporter")[name], exportable_hybrid(family))
    if outcome == "unavailable":
        pytest.skip(f"exporter {name!r} cannot write its format here")
    if name == "qwen3_5":
        assert outcome == ("exact" if family == "qwen3" else "approximate")


def test_qwen3_5_knows_every_gdn_option():
    assert qwen3_5._GDN_KNOWN == {f.name for f in attrs.fields(GDNConfig)}


def _save(tmp_path, hybrid, name="model"):
    return save_hybrid(hybrid, tmp_path / name, tiny_tokenizer(hybrid.config.vocab_size))


_STOCK = """\
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = m(ids).logits
out = m.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
kinds = ["linear" if hasattr(layer, "linear_attn") else "full" for layer in m.model.layers]
torch.save({"logits": logits, "greedy": out, "cls": type(m).__name__, "type": m.config.model_type, "kinds": kinds,
            "hybridize": sorted(n for n in sys.modules if n.split(".")[0] == "hybridize")}, sys.argv[3])
"""


@needs_qwen3_5
def test_qwen3_hybrid_exports_exactly_and_loads_without_hybridize(tmp_path):
    hybrid = exportable_hybrid("qwen3", softmax=(0, 3))  # an irregular layout: layer_types must be honoured
    assert main(["export", str(_save(tmp_path, hybrid)), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["exact"] and report["class"] == "Qwen3_5ForCausalLM" and report["dropped_tensors"] == []
    assert report["layer_types"] == ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    assert report["parity"]["max_abs_logit_diff"] <= 1e-4 and report["parity"]["greedy_agreement"] == 1.0
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = hybrid(ids).logits
    greedy = hybrid.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    proc = run_without_hybridize([sys.executable, "-c", _STOCK, str(tmp_path / "out"), json.dumps(ids.tolist()),
                                  str(tmp_path / "stock.pt")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "stock.pt", weights_only=True)
    assert (got["cls"], got["type"], got["hybridize"]) == ("Qwen3_5ForCausalLM", "qwen3_5_text", [])
    assert got["kinds"] == ["full", "linear", "linear", "full"]
    assert (got["logits"] - logits).abs().max() <= 1e-4
    assert torch.equal(got["greedy"], greedy)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()


def _nothing_written(tmp_path):
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_gla_hybrid_is_refused_with_one_message(tmp_path, capsys):
    path = _save(tmp_path, exportable_hybrid("llama", variant="gla"))
    capsys.readouterr()  # the save's progress bars
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hybridize: error: ")
    assert "linear attention 'gla' has no counterpart in qwen3_5" in err
    assert "Formats that exist: qwen3_5: " in err and err.endswith("Nothing was written")
    assert _nothing_written(tmp_path)


def test_gdn_options_without_a_mapping_are_refused(tmp_path):
    hybrid = exportable_hybrid("qwen3")
    hybrid.config.hybridize["variant_params"].update(use_gate=False, conv_activation="none", future_option=1)
    check = qwen3_5.Qwen35Exporter(qwen3_5.Qwen35ExportConfig()).check(hybrid.config)
    assert [r.split(":")[0] for r in check.refusals] == [
        "gdn option 'future_option' has no known mapping to qwen3_5", "gdn option use_gate=false",
        "gdn option conv_activation='none'"]


@needs_qwen3_5
def test_an_approximate_export_is_refused_with_its_distance(tmp_path):
    path = _save(tmp_path, exportable_hybrid("llama"))
    with pytest.raises(ExportError) as exc:
        export(path, tmp_path / "out", ExportOptions(progress=False))
    msg = str(exc.value)
    assert "qwen3_5 applies q/k RMSNorm, which the llama teacher's attention does not" in msg
    assert "max |logit difference|" in msg and "KL" in msg and "--heal-tokens" in msg and msg.endswith("nothing was written")
    assert _nothing_written(tmp_path)


def test_qwen3_gdn_with_teacher_norms_or_another_eps_is_approximate():
    hybrid = exportable_hybrid("qwen3")
    hybrid.config.hybridize["variant_params"].update(qk_norm=True, norm_eps=1e-3)
    check = qwen3_5.Qwen35Exporter(qwen3_5.Qwen35ExportConfig()).check(hybrid.config)
    assert not check.refusals and len(check.differences) == 2
    assert "qk_norm: false" in check.differences[0] and "norm_eps: 1e-06" in check.differences[1]


def test_without_qwen3_5_in_transformers_the_export_says_which_version(tmp_path, monkeypatch):
    path = _save(tmp_path, exportable_hybrid("qwen3"))
    monkeypatch.setitem(sys.modules, "transformers.models.qwen3_5", None)  # as in a release without it
    with pytest.raises(ExportError, match=r"needs transformers' qwen3_5 model .* install transformers>=5.17"):
        export(path, tmp_path / "out", ExportOptions(progress=False))
    assert _nothing_written(tmp_path)


def test_heal_tokens_needs_data_before_anything_runs(tmp_path):
    path = _save(tmp_path, exportable_hybrid("llama"))
    with pytest.raises(ConfigError, match="--heal-tokens needs --data"):
        export(path, tmp_path / "out", ExportOptions(heal_tokens=100, progress=False))


@needs_qwen3_5
def test_out_is_never_a_users_directory(tmp_path):
    path = _save(tmp_path, exportable_hybrid("qwen3"))
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="already exists|not an export written by hybridize"):
            export(path, mine, ExportOptions(overwrite=overwrite, progress=False))
    assert (mine / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="directory of its own"):
        export(path, path, ExportOptions(progress=False))
    (mine / "notes.txt").unlink()
    export(path, mine, ExportOptions(progress=False))
    again = export(path, mine, ExportOptions(overwrite=True, progress=False))  # an earlier export may be replaced
    assert again["exact"] and (mine / REPORT).is_file()


class _NoneFormat:
    """A third-party format that takes nothing: registered on a fresh manager, it joins the list of formats."""

    summary = "none: a test format that refuses every hybrid"

    def __init__(self, config):
        pass

    def unavailable(self):
        return None

    def check(self, config):
        return ExportCheck(refusals=["the none format holds nothing"])

    def convert(self, model):
        raise AssertionError("never called: check refused")


@attrs.frozen
class _NoneConfig:
    pass


class _NonePlugin:
    @hookimpl
    def hybridize_register_exporters(self, register):
        register("none", _NoneFormat, _NoneConfig)


def test_hook_hybridize_register_exporters(tmp_path, hybridize_pm):
    hybridize_pm.register(_NonePlugin(), name="none-plugin")
    assert set(hybridize_pm.registry("exporter")) == {"none", *EXPORTERS}
    path = _save(tmp_path, exportable_hybrid("qwen3"))
    with pytest.raises(ExportError) as exc:
        export(path, tmp_path / "out", ExportOptions(format="none", progress=False), pm=hybridize_pm)
    assert "cannot be exported to 'none': the none format holds nothing" in str(exc.value)
    assert "none: a test format that refuses every hybrid" in str(exc.value) and "qwen3_5: " in str(exc.value)
    assert _nothing_written(tmp_path)


@needs_qwen3_5
def test_a_failed_reload_check_leaves_nothing_behind(tmp_path, monkeypatch):
    from hybridize.model import export as engine

    def broken(tmp):
        raise ExportError("the exported directory does not load cleanly (simulated)")

    monkeypatch.setattr(engine, "_reload", broken)
    with pytest.raises(ExportError, match="simulated"):
        export(_save(tmp_path, exportable_hybrid("qwen3")), tmp_path / "out", ExportOptions(progress=False))
    assert _nothing_written(tmp_path)
