"""NaN / inf in a probe: detected, retried once from its last checkpoint at a lower lr, else failed and unranked."""
from __future__ import annotations

import json

import attrs
import pytest
import torch
import yaml

from hybridize import hookimpl
from hybridize.cli import main
from hybridize.registry.configs import ComponentRef
from hybridize.training.data import DataConfig, prepare_data
from hybridize.distill.stages import DistillConfig
from hybridize.errors import HybridizeError
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.engine import ProbeDivergedWarning, SelectionConfig, SelectionEngine
from hybridize.testing.models import save_tiny_teacher, tiny_model, tiny_tokenizer

TEXT = "\n\n".join(f"record {i}: key {chr(97 + i % 26)}{chr(97 + (3 * i) % 26)} has value {i % 10}." for i in range(60))
DISTILL = DistillConfig(stage1_tokens=256, stage2_tokens=0, batch_size=4, eval_blocks=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not suffer from a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def data(corpus):
    return prepare_data(DataConfig(train=str(corpus), seq_len=16, heldout_fraction=0.1), tiny_tokenizer(), seed=0)


def engine(data, *, k=1, scorer=None, pm=None, ckpt=None, selector="kl-greedy-add"):
    cfg = SelectionConfig(selector=selector, scorer=scorer, stop=ComponentRef(name="fixed-budget"), probe_tokens=256, eval_every=2)
    return SelectionEngine(teacher=tiny_model("llama", n_layer=4), data=data, cfg=cfg, distill=DISTILL, variant=ComponentRef(name="gdn"),
                           pm=pm or get_plugin_manager(), device=torch.device("cpu"), k=k, ckpt_dir=ckpt, progress=False)


@pytest.fixture(scope="module")
def clean(data):
    return engine(data).run()


def messages(record):
    return [str(w.message) for w in record if issubclass(w.category, ProbeDivergedWarning)]


def test_a_probe_that_stays_nan_is_retried_once_then_failed_and_unranked(data, clean, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@2:1+")  # layer 2's probe loss is NaN at every step
    with pytest.warns(ProbeDivergedWarning) as record:
        result = engine(data).run()
    assert messages(record) == [
        "probe of layer 2 diverged (non-finite training loss) in the window ending at probe step 2; retrying it once "
        "from its checkpoint at step 0 with learning rates x0.1",
        "probe of layer 2 failed (non-finite training loss after its retry at lr x0.1) at probe step 2; layer 2 is left "
        "out of the ranking and cannot be selected",
    ]
    assert result["probe_status"] == {2: {"status": "failed", "step": 2, "reason": "non-finite training loss after its retry at lr x0.1",
                                          "lr_scale": 0.1}}
    assert result["failed_layers"] == [2]
    assert 2 not in result["scores"] and 2 not in result["raw_scores"] and 2 not in result["ranking"]
    assert all(2 not in w["raw"] and 2 not in w["top_k"] for w in result["trajectory"])
    assert {l: result["scores"][l] for l in (0, 1, 3)} == {l: clean["scores"][l] for l in (0, 1, 3)}  # the others are untouched
    assert result["softmax_layers"] == [max((0, 1, 3), key=lambda l: clean["scores"][l])]


def test_a_probe_that_recovers_after_its_retry_stays_ranked(data, clean, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@2:3")  # one NaN, in the second window
    with pytest.warns(ProbeDivergedWarning) as record:
        result = engine(data).run()
    assert messages(record) == [
        "probe of layer 2 diverged (non-finite training loss) in the window ending at probe step 4; retrying it once "
        "from its checkpoint at step 2 with learning rates x0.1"
    ]
    assert result["probe_status"][2]["status"] == "retried" and result["failed_layers"] == []
    assert sorted(result["ranking"]) == [0, 1, 2, 3]
    assert result["raw_scores"][2] != clean["raw_scores"][2]  # the retried window ran at the lower lr
    assert result["trajectory"][0] == clean["trajectory"][0]  # the first window is unaffected


def test_the_retry_restarts_from_the_checkpoint_on_disk_and_the_status_survives_resume(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@1:1+")
    with pytest.warns(ProbeDivergedWarning):
        first = engine(data, ckpt=tmp_path).run()
    monkeypatch.delenv("HYBRIDIZE_FAULT")
    again = engine(data, ckpt=tmp_path).run()  # resumed from the finished checkpoint
    assert again["probe_status"] == first["probe_status"] and again["failed_layers"] == [1]
    assert again["scores"] == first["scores"]


class InfScorer:
    """A scorer plugin whose score of layer 0 is +inf: the score path of the guard."""

    requires = "probe"

    def __init__(self, config):
        pass

    def __call__(self, ctx):
        return {l: float("inf") if l == 0 else float(ctx.heldout_kl(ctx.probes[l])) for l in ctx.layers}


@attrs.frozen
class InfConfig:
    pass


class InfPlugin:
    @hookimpl
    def hybridize_register_scorers(self, register):
        register("inf-for-layer-0", InfScorer, InfConfig)


def test_an_infinite_score_is_caught_too(data, pm):
    pm.register(InfPlugin(), name="inf-plugin")
    with pytest.warns(ProbeDivergedWarning, match=r"probe of layer 0 failed \(non-finite score inf after its retry"):
        result = engine(data, scorer=ComponentRef(name="inf-for-layer-0"), pm=pm).run()
    assert result["failed_layers"] == [0] and 0 not in result["ranking"]


def test_fewer_healthy_probes_than_k_is_an_error(data, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@0:1+,probe-nan@1:1+,probe-nan@2:1+")
    with pytest.warns(ProbeDivergedWarning), pytest.raises(HybridizeError) as exc:
        engine(data, k=2).run()
    assert str(exc.value) == (
        "only 1 probe(s) finished with finite scores (failed: layers [0, 1, 2]), fewer than K=2; lower "
        "selection.probe_lr_attn / probe_lr_other and run the command again with --overwrite (failed probes cannot "
        "be resumed), or check the data"
    )


def test_fewer_healthy_probes_than_k_then_doing_what_the_message_says_works(tmp_path, corpus, monkeypatch, capsys):
    """The message's advice, followed to the letter: lower the probe lrs, the same command with --overwrite."""
    cfg = {"teacher": str(save_tiny_teacher(tmp_path / "teacher", n_layer=3)), "data": {"train": str(corpus), "seq_len": 16},
           "softmax_layers": 2, "device": "cpu",
           "selection": {"stop": "fixed-budget", "probe_tokens": 128, "eval_every": 1, "probe_lr_attn": 1.0},
           "distill": {"stage1_tokens": 128, "stage2_tokens": 64, "batch_size": 4, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"]
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@0:1+,probe-nan@1:1+")  # as a too-high probe lr would
    with pytest.warns(ProbeDivergedWarning):
        assert main(argv) == 2
    assert "fewer than K=2; lower selection.probe_lr_attn / probe_lr_other and run the command again with --overwrite" \
        in capsys.readouterr().err
    monkeypatch.delenv("HYBRIDIZE_FAULT")
    assert main([*argv, "--set", "selection.probe_lr_attn=1e-3", "--overwrite"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(result["softmax_layers"]) == 2 and result["config"]["selection"]["probe_lr_attn"] == 1e-3


def test_cli_run_marks_the_failed_probe_in_result_json(tmp_path, corpus, monkeypatch, capsys):
    cfg = {"teacher": str(save_tiny_teacher(tmp_path / "teacher", n_layer=4)), "data": {"train": str(corpus), "seq_len": 16},
           "softmax_layers": 1, "device": "cpu",
           "selection": {"selector": "kl-greedy-remove", "stop": "fixed-budget", "probe_tokens": 128, "eval_every": 1},
           "distill": {"stage1_tokens": 128, "stage2_tokens": 64, "batch_size": 4, "eval_blocks": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("HYBRIDIZE_FAULT", "probe-nan@3:1+")
    with pytest.warns(ProbeDivergedWarning, match="probe of layer 3 failed"):
        assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["selection"]["failed_layers"] == [3]
    assert result["selection"]["probe_status"]["3"]["status"] == "failed"
    assert "3" not in result["scores"] and 3 not in result["ranking"] and 3 not in result["softmax_layers"]


def test_bad_retry_scale_is_a_config_error():
    from hybridize.registry.configs import build_config

    with pytest.raises(HybridizeError, match=r"selection field 'nan_retry_lr_scale' must be < 1.0; got 1.0"):
        build_config(SelectionConfig, {"nan_retry_lr_scale": 1.0}, context="selection")
