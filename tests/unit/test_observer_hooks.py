"""Observer hooks: impls may take any subset of the spec's arguments; unknown arguments are rejected."""
from __future__ import annotations

import pluggy
import pytest

from hybridize import hookimpl


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def hybridize_run_start(self, run_dir, config):
        self.calls.append(("run_start", run_dir, config))

    @hookimpl
    def hybridize_step_end(self, stage, metrics):  # a subset of the spec's arguments
        self.calls.append(("step_end", stage, metrics))

    @hookimpl
    def hybridize_selection_done(self, softmax_layers, scores):
        self.calls.append(("selection_done", softmax_layers, scores))

    @hookimpl
    def hybridize_run_end(self, result):
        self.calls.append(("run_end", result))


@pytest.fixture
def recorder(hybridize_bare_pm):
    rec = Recorder()
    hybridize_bare_pm.register(rec)
    hybridize_bare_pm.check_pending()
    return hybridize_bare_pm, rec


def test_hook_hybridize_run_start(recorder):
    pm, rec = recorder
    assert pm.hook.hybridize_run_start(run_dir="out", config={"seed": 0}) == []
    assert rec.calls == [("run_start", "out", {"seed": 0})]


def test_hook_hybridize_step_end(recorder):
    pm, rec = recorder
    pm.hook.hybridize_step_end(stage="stage1", step=1, tokens=512, metrics={"loss": 1.0})
    assert rec.calls == [("step_end", "stage1", {"loss": 1.0})]


def test_hook_hybridize_selection_done(recorder):
    pm, rec = recorder
    pm.hook.hybridize_selection_done(softmax_layers=[1, 3], scores={0: 0.1, 1: 0.9})
    assert rec.calls == [("selection_done", [1, 3], {0: 0.1, 1: 0.9})]


def test_hook_hybridize_run_end(recorder):
    pm, rec = recorder
    pm.hook.hybridize_run_end(run_dir=None, result={"softmax_layers": [2]})
    assert rec.calls == [("run_end", {"softmax_layers": [2]})]


def test_impl_with_unknown_argument_is_rejected(hybridize_bare_pm):
    class Bad:
        @hookimpl
        def hybridize_step_end(self, stage, lossy):
            pass

    with pytest.raises(pluggy.PluginValidationError, match="lossy"):
        hybridize_bare_pm.register(Bad())


def test_pipeline_reports_steps_and_windows_to_log_and_hooks(recorder, tmp_path):
    """Steps and selection windows reach OUT/metrics.jsonl and hybridize_step_end (probes as "probe:<layer>")."""
    import json

    from hybridize.recipes.outputs import MetricsLog
    from hybridize.recipes.run import _observe, _observe_windows

    pm, rec = recorder
    log = MetricsLog(tmp_path, resume=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # created by the first line, not before
    _observe(pm, log)("stage2", 3, 96, {"loss": 0.5, "lr": 1e-3})
    _observe_windows(pm, log)({"step": 4, "tokens_per_probe": 128, "top_k": [1], "jaccard_prev": 1.0,
                               "raw": {0: 0.3, 1: 0.1}, "importance": {0: -0.3, 1: -0.1}})
    log.close()
    assert rec.calls == [("step_end", "stage2", {"loss": 0.5, "lr": 1e-3}),
                         ("step_end", "probe:0", {"score": 0.3, "importance": -0.3}),
                         ("step_end", "probe:1", {"score": 0.1, "importance": -0.1})]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == ["stage2", "selection"] and lines[0]["loss"] == 0.5 and lines[1]["top_k"] == [1]
    resumed = MetricsLog(tmp_path, resume=True)
    resumed.write({"stage": "stage2", "step": 3, "tokens": 96, "loss": 0.4})
    resumed.write({"stage": "stage2", "step": 4, "tokens": 128, "loss": 0.3})
    resumed.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("event") for x in lines[2:]] == ["resume", None, None]
