"""One plugin manager per command: `hybridize run` / `compare` load the entry points once, and that one manager
(with an observer plugin registered on it) sees every hook of the command; compare reports like run does."""
from __future__ import annotations

import json

import pytest
import yaml

from hybridize import hookimpl
from hybridize.cli import main
from hybridize.registry.manager import HybridizePluginManager
from hybridize.testing.models import save_tiny_teacher

TEXT = "\n\n".join(f"item {i}: the {chr(97 + i % 26)} box holds {i % 7} stones and {i % 5} keys." for i in range(160))


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def hybridize_run_start(self, run_dir, config):
        self.calls.append(("run_start", run_dir))

    @hookimpl
    def hybridize_step_end(self, stage):
        self.calls.append(("step_end", stage))

    @hookimpl
    def hybridize_selection_done(self, softmax_layers):
        self.calls.append(("selection_done", list(softmax_layers)))

    @hookimpl
    def hybridize_run_end(self, run_dir, result):
        self.calls.append(("run_end", run_dir))

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("onepm")
    teacher = save_tiny_teacher(root / "teacher", "llama", n_layer=4, seed=3)
    (root / "corpus.txt").write_text(TEXT)
    return root, teacher


def config(root, teacher, **extra):
    return {
        "teacher": str(teacher), "device": "cpu", "seed": 0,
        "data": {"train": str(root / "corpus.txt"), "seq_len": 32, "heldout_fraction": 0.1},
        "linear_attention": {"name": "gdn"}, "softmax_layers": 1,
        "selection": {"selector": "kl-greedy-add", "stop": {"name": "fixed-budget"}, "probe_tokens": 256, "eval_every": 1},
        "distill": {"stage1_tokens": 512, "stage2_tokens": 256, "batch_size": 8, "eval_blocks": 2},
        "evaluators": [{"name": "heldout-kl"}],
        **extra,
    }


@pytest.fixture
def counted(monkeypatch):
    """Count entry-point loads; register an observer plugin on every manager that loads them."""
    monkeypatch.delenv("HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    rec, loads = Recorder(), []
    original = HybridizePluginManager.load_entrypoints

    def load_entrypoints(self, **kwargs):
        loads.append(self)
        names = original(self, **kwargs)
        self.register(rec, name="test-recorder")
        return names

    monkeypatch.setattr(HybridizePluginManager, "load_entrypoints", load_entrypoints)
    return rec, loads


def test_run_loads_entry_points_once_and_load_hybrid_takes_the_manager(setup, tmp_path, counted):
    root, teacher = setup
    rec, loads = counted
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config(root, teacher)))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet"]) == 0
    assert len(loads) == 1
    names = rec.names()
    assert names[0] == "run_start" and names[-1] == "run_end" and "selection_done" in names
    from hybridize.model.hybrid import load_hybrid

    model = load_hybrid(out / "model", pm=loads[0])
    assert model.config.hybridize["linear_layers"] and len(loads) == 1


def test_compare_loads_entry_points_once_fires_observer_hooks_and_writes_metrics(setup, tmp_path, counted):
    root, teacher = setup
    rec, loads = counted
    cfg = config(root, teacher, compare={"selectors": ["kl-greedy-add", "uniform"], "softmax_layers": [1], "seeds": [0]})
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "compare.yaml"), "--out", str(out), "--quiet"]) == 0
    assert len(loads) == 1
    names = rec.names()
    assert names[0] == "run_start" and names[-1] == "run_end"
    assert rec.calls[0][1] == rec.calls[-1][1] == str(out)
    assert names.count("selection_done") == 2  # one per selection
    assert any(c[0] == "step_end" and c[1].startswith("probe:") for c in rec.calls)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and {x["stage"] for x in lines} >= {"selection", "stage2"}
    assert "kl-greedy-add" in {x["selector"] for x in lines if x["stage"] == "selection"}
    assert all(x["seed"] == 0 for x in lines)
    assert json.loads((out / "compare.json").read_text())["rows"]
