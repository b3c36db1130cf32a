"""Selection end to end on tiny teachers: the informative layer is found, resume is exact, `hybridize run` works."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from hybridize.cli import main
from hybridize.registry.configs import ComponentRef
from hybridize.training.data import DataConfig, prepare_data
from hybridize.distill.stages import DistillConfig
from hybridize.errors import ConfigError
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.engine import SelectionConfig, SelectionEngine
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
    # the live log: shared stage 1, one line per selection window, the final stage 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in lines]
    assert stages == sorted(stages, key=["stage1", "selection", "stage2"].index)
    windows = [r for r in lines if r["stage"] == "selection"]
    assert [w["top_k"] for w in windows] == [t["top_k"] for t in result["selection"]["trajectory"]]
    assert stages.count("stage2") == 4 and all(math.isfinite(r["loss"]) for r in lines if r["stage"] == "stage2")
    assert all(r["wall"] >= 0 for r in lines)


def test_probe_groups_give_the_same_scores(data):
    teacher = tiny_model("llama", n_layer=4)
    together = engine(teacher, data, "kl-greedy-remove", probe_tokens=768).run()
    e = engine(teacher, data, "kl-greedy-remove", probe_tokens=768)
    e.cfg = SelectionConfig(selector=ComponentRef(name="kl-greedy-remove"), stop=ComponentRef(name="fixed-budget"),
                            probe_tokens=768, eval_every=1, probe_group_size=3)
    grouped = e.run()
    assert grouped["trajectory"] == together["trajectory"]
    assert grouped["tokens"]["teacher_forward"] == together["tokens"]["teacher_forward"]


# -- probe variant != final variant ------------------------------------------------------------------
def test_gdn_probes_choose_the_layers_of_a_gla_hybrid(tmp_path, corpus, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher", n_layer=4)
    cfg = {"teacher": str(teacher), "data": {"train": str(corpus), "seq_len": 32}, "linear_attention": {"name": "gla"},
           "softmax_layers": 1, "selection": {"selector": "kl-greedy-add", "linear_attention": {"name": "gdn"},
                                              "stop": "fixed-budget", "probe_tokens": 512, "eval_every": 1},
           "distill": {"stage1_tokens": 512, "stage2_tokens": 256, "batch_size": 8, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (result["linear_attention"], result["probe_linear_attention"]) == ("gla", "gdn")
    assert result["selection"]["linear_attention"] == {"name": "gdn"}
    assert result["selection"]["final_linear_attention"] == {"name": "gla"}
    assert result["config"]["selection"]["linear_attention"] == {"name": "gdn"}
    t = result["tokens"]  # a GDN stage 1 cannot seed GLA layers: the final hybrid ran its own
    assert not t["stage1_shared_with_final"] and t["stage1_selection"] >= 512 and t["stage1_final"] >= 512
    assert t["stage1"] == t["stage1_selection"] + t["stage1_final"]
    saved = json.loads((out / "model" / "config.json").read_text())["hybridize"]
    assert saved["variant"] == "gla" and saved["softmax_layers"] == result["softmax_layers"]


def test_probe_variant_defaults_to_the_final_variant_and_is_validated(corpus):
    from hybridize.recipes.runconfig import run_config_from_dict

    tree = {"teacher": "t", "data": {"train": str(corpus)}, "linear_attention": "gla"}
    assert run_config_from_dict(tree).selection.linear_attention is None
    tree["selection"] = {"linear_attention": {"name": "gdm"}}
    with pytest.raises(ConfigError, match=r"selection field 'linear_attention' \(the probes' variant\): Unknown linear attention 'gdm'. Did you mean: gdn"):
        run_config_from_dict(tree)


# -- distance regularisation in the engine ------------------------------------------------------------
def test_min_gap_in_the_engine(data):
    plain = engine(one_layer_teacher(1), data, "grad-sensitivity", k=2).run()
    spaced = engine(one_layer_teacher(1), data, {"name": "grad-sensitivity", "min_gap": 2}, k=2).run()
    # layer 1 first; layers 0, 2, 3 score 0 and tie (lower index first): plain adds 0, min_gap 2 skips 0 and 2
    assert plain["softmax_layers"] == [0, 1] and spaced["softmax_layers"] == [1, 3]
    assert plain["scores"] == spaced["scores"] and plain["trajectory"][-1]["top_k"] == [0, 1]
    assert spaced["components"]["choice"] == {"min_gap": 2} and "choice" not in plain["components"]
    with pytest.raises(ConfigError, match="field 'min_gap' must leave room for K=3 softmax layers among 4"):
        engine(one_layer_teacher(2), data, {"name": "uniform", "min_gap": 2}, k=3)


# -- teacher-only / stage-1 proxies --------------------------------------------------------------------
PROXIES = [n for n in SELECTORS if "proxy" in get_plugin_manager().registry("selector")[n].capabilities]


def heldout_tokens(data):
    return data.heldout[: DISTILL.eval_blocks].numel()


def test_proxies_are_registered():
    assert set(PROXIES) >= {"swap-kl", "grad-sensitivity", "attention-entropy"}


@pytest.mark.parametrize("selector", ["swap-kl", "grad-sensitivity"])
def test_proxy_finds_the_informative_layer(data, selector):
    a = engine(one_layer_teacher(2), data, selector).run()
    b = engine(one_layer_teacher(2), data, selector).run()
    assert a["ranking"][0] == 2 and a["softmax_layers"] == [2], a["raw_scores"]
    assert a["raw_scores"] == b["raw_scores"]  # deterministic
    assert all(a["raw_scores"][l] == 0.0 for l in (0, 1, 3))  # attention that never reaches the residual: no KL, no gradient


def sharp_teacher(sharp: int = 1, n_layer: int = 4) -> torch.nn.Module:
    """A teacher whose layer ``sharp`` attends almost one-hot (large query scale) while the others stay diffuse."""
    teacher = tiny_model("llama", n_layer=n_layer, seed=1)
    with torch.no_grad():
        for i, layer in enumerate(teacher.model.layers):
            layer.self_attn.q_proj.weight.mul_(40.0 if i == sharp else 0.05)
    return teacher


def test_attention_entropy_ranks_the_sharpest_layer_first(data):
    a = engine(sharp_teacher(1), data, "attention-entropy").run()
    assert a["ranking"][0] == 1 and a["softmax_layers"] == [1], a["raw_scores"]
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in a["raw_scores"].values())
    assert a["raw_scores"][1] < 0.5 < min(v for l, v in a["raw_scores"].items() if l != 1)
    assert engine(sharp_teacher(1), data, "attention-entropy").run()["raw_scores"] == a["raw_scores"]


def test_attention_entropy_of_uniform_attention_is_one(data):
    teacher = tiny_model("llama", n_layer=3, seed=1)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.zero_()  # every score 0: uniform over the visible keys
    raw = engine(teacher, data, "attention-entropy").run()["raw_scores"]
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in raw.values())


def test_grad_sensitivity_equals_per_position_loss_derivatives(data):
    """raw(l) = sum_t |dCE/d alpha_t| with a_l(t) scaled by alpha_t: an independent way to the same number."""
    from hybridize.training.losses import chunked_ce

    teacher = tiny_model("llama", n_layer=3, seed=2)
    raw = engine(teacher, data, "grad-sensitivity").run()["raw_scores"]
    batches = data.heldout[: DISTILL.eval_blocks].split(DISTILL.batch_size)
    for layer in range(3):
        total = 0.0
        for ids in batches:
            alpha = torch.ones(*ids.shape, 1, requires_grad=True)
            hook = teacher.model.layers[layer].self_attn.register_forward_hook(lambda m, a, o: (o[0] * alpha, *o[1:]))
            try:
                h = teacher.model(input_ids=ids).last_hidden_state
            finally:
                hook.remove()
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            (g,) = torch.autograd.grad(chunked_ce(h, labels, teacher.lm_head), alpha)
            total += float(g.abs().sum()) / len(batches)
        assert raw[layer] == pytest.approx(total, rel=1e-4)


def test_proxy_token_costs_are_counted_and_small(data):
    n = heldout_tokens(data)
    grad = engine(one_layer_teacher(2), data, "grad-sensitivity").run()["tokens"]
    assert (grad["teacher_forward"], grad["teacher_backward"], grad["stage1"], grad["n_probes"]) == (n, n, 0, 0)
    assert grad["compute"] == grad["compute_beyond_stage1"] == n
    entropy = engine(one_layer_teacher(2), data, "attention-entropy").run()["tokens"]
    assert (entropy["teacher_forward"], entropy["teacher_backward"], entropy["compute"]) == (n, 0, n)
    swap = engine(one_layer_teacher(2), data, "swap-kl").run()["tokens"]
    assert swap["eval_forward"] == 4 * n  # one forward per swapped layer
    assert swap["compute_beyond_stage1"] == 4 * n + n  # and the teacher's reference pass
    assert swap["stage1"] == DISTILL.stage1_tokens
    ga = engine(one_layer_teacher(2), data, "kl-greedy-add", probe_tokens=1024).run()["tokens"]
    assert ga["eval_forward"] >= 4 * n * 4  # every probe, every window
    for t in (grad, entropy, swap):
        assert t["compute_beyond_stage1"] < 0.2 * ga["compute_beyond_stage1"]
