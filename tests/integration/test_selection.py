"""Selection end to end on tiny teachers: the informative layer is found, resume is exact, `hybridize run` works."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from hybridize.cli import main
from hybridize.config import ComponentRef
from hybridize.data import DataConfig, prepare_data
from hybridize.distill import DistillConfig
from hybridize.plugins_manager import get_plugin_manager
from hybridize.select import SelectionConfig, SelectionEngine
from hybridize.testing.models import save_tiny_teacher, tiny_model, tiny_tokenizer

TEXT = "\n\n".join(
    f"record {i}: key {chr(97 + i % 26)}{chr(97 + (3 * i) % 26)} has value {i % 10}. again, {chr(97 + i % 26)}{chr(97 + (3 * i) % 26)} is {i % 10}."
    for i in range(200)
)
SELECTORS = sorted(get_plugin_manager().registry("selector"))
DISTILL = DistillConfig(stage1_tokens=2048, stage2_tokens=0, batch_size=8, eval_blocks=4, stage1_lr=3e-3,
                        stage2_lr_attn=3e-3, stage2_lr_other=1e-3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def data(corpus):
    return prepare_data(DataConfig(train=str(corpus), seq_len=32, heldout_fraction=0.1), tiny_tokenizer(), seed=0)


def one_layer_teacher(informative: int = 2, n_layer: int = 4) -> torch.nn.Module:
    """A teacher in which only one layer's attention reaches the residual stream."""
    teacher = tiny_model("llama", n_layer=n_layer, seed=1)
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            if i != informative:
                layer.self_attn.o_proj.weight.zero_()
            else:
                layer.self_attn.o_proj.weight.mul_(4.0)
    return teacher


def engine(teacher, data, selector, *, k=1, probe_tokens=1024, ckpt=None, on_window=None, stop="fixed-budget", seed=0):
    cfg = SelectionConfig(selector=selector, stop=ComponentRef(name=stop), probe_tokens=probe_tokens, eval_every=1)
    return SelectionEngine(teacher=teacher, data=data, cfg=cfg, distill=DISTILL, variant=ComponentRef(name="gdn"),
                           pm=get_plugin_manager(), device=torch.device("cpu"), k=k, ckpt_dir=ckpt, seed=seed,
                           progress=False, on_window=on_window)


@pytest.mark.parametrize("selector", ["kl-greedy-add", "kl-greedy-remove"])
def test_probe_selectors_find_the_informative_layer(data, selector):
    result = engine(one_layer_teacher(2), data, selector).run()
    assert result["ranking"][0] == 2, result["raw_scores"]
    assert result["softmax_layers"] == [2]


@pytest.mark.parametrize("selector", SELECTORS)
def test_every_selector_gives_k_unique_layers_deterministically(data, selector):
    teacher = tiny_model("llama", n_layer=4)
    a = engine(teacher, data, selector, k=2, probe_tokens=512).run()
    b = engine(teacher, data, selector, k=2, probe_tokens=512).run()
    assert len(set(a["softmax_layers"])) == 2 and all(0 <= l < 4 for l in a["softmax_layers"])
    assert a["softmax_layers"] == b["softmax_layers"] and a["scores"] == b["scores"]
    assert sorted(a["ranking"]) == [0, 1, 2, 3]


def test_token_accounting_shares_stage1_and_teacher(data):
    result = engine(tiny_model("llama", n_layer=4), data, "kl-greedy-add", probe_tokens=1024).run()
    t = result["tokens"]
    assert t["n_probes"] == 4 and t["probe_each"] >= 1024 and t["probes_total"] == 4 * t["probe_each"]
    assert t["teacher_forward"] < t["probes_total"]  # one teacher pass per batch serves all probes
    assert t["cost_ratio"] <= 0.35


class Crash(Exception):
    pass


def test_killed_selection_resumes_with_the_same_scores(tmp_path, data):
    teacher = tiny_model("llama", n_layer=3)
    ref = engine(teacher, data, "kl-greedy-add", probe_tokens=1536, ckpt=tmp_path / "a").run()

    def crash(window):
        if len(window) and window["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        engine(teacher, data, "kl-greedy-add", probe_tokens=1536, ckpt=tmp_path / "b", on_window=crash).run()
    resumed = engine(teacher, data, "kl-greedy-add", probe_tokens=1536, ckpt=tmp_path / "b").run()
    assert resumed["trajectory"] == ref["trajectory"]
    assert resumed["scores"] == ref["scores"]


def test_cli_run_end_to_end(tmp_path, corpus, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher", n_layer=4)
    cfg = {"teacher": str(teacher), "data": {"train": str(corpus), "seq_len": 32}, "linear_attention": {"name": "gdn"},
           "softmax_layers": 0.25, "selection": {"selector": {"name": "kl-greedy-add"}, "stop": {"name": "rolling-jaccard", "windows": 3},
                                                 "probe_tokens": 1024, "eval_every": 1},
           "distill": {"stage1_tokens": 1024, "stage2_tokens": 1024, "batch_size": 8, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["softmax_layers"]) == 1 and set(result["scores"]) == {"0", "1", "2", "3"}
    assert result["tokens"]["stage1_shared_with_final"] and result["tokens"]["n_probes"] == 4
    assert result["tokens"]["selection_cost_ratio"] <= 0.35
    assert len(result["selection"]["trajectory"]) >= 3
    for name in ("scores.png", "jaccard.png", "distill.png", "model/config.json"):
        assert (out / name).exists(), name
    assert "selected softmax layers" in capsys.readouterr().out


def test_probe_groups_give_the_same_scores(data):
    teacher = tiny_model("llama", n_layer=4)
    together = engine(teacher, data, "kl-greedy-remove", probe_tokens=768).run()
    e = engine(teacher, data, "kl-greedy-remove", probe_tokens=768)
    e.cfg = SelectionConfig(selector=ComponentRef(name="kl-greedy-remove"), stop=ComponentRef(name="fixed-budget"),
                            probe_tokens=768, eval_every=1, probe_group_size=3)
    grouped = e.run()
    assert grouped["trajectory"] == together["trajectory"]
    assert grouped["tokens"]["teacher_forward"] == together["tokens"]["teacher_forward"]
