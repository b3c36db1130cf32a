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
