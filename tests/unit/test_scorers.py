"""Scorers with fake score contexts: what they return, and their errors when the context lacks inputs."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from hybridize.distill.stages import HeldoutEvaluator, alignment_losses, linear_modules
from hybridize.model.surgery import build_student
from hybridize.testing.models import tiny_model

from hybridize.errors import ConfigError, HybridizeError
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.contract import ScoreContext, rank

SCORERS = sorted(get_plugin_manager().registry("scorer"))


class FakeProbe(nn.Module):
    """A stand-in probe student whose held-out KL is known."""

    def __init__(self, kl: float):
        super().__init__()
        self.kl = kl


def make(pm, kind, name, **kw):
    entry = pm.registry(kind)[name]
    return entry.factory(entry.build_config({}), **kw)


def probe_context(kls, layers=None):
    calls = []

    def heldout_kl(model):
        calls.append(model)
        return model.kl

    probes = {l: FakeProbe(v) for l, v in kls.items()}
    ctx = ScoreContext(layers=sorted(kls) if layers is None else layers, probes=probes, heldout_kl=heldout_kl)
    return ctx, calls


def stage1_context(residuals, layers=None):
    calls = []

    def stage1_residuals():
        calls.append(1)
        return dict(residuals)

    return ScoreContext(layers=sorted(residuals) if layers is None else layers, stage1_residuals=stage1_residuals), calls


def test_builtins_registered(pm):
    reg = pm.registry("scorer")
    assert {"kl", "mse"} <= set(reg)
    assert reg["kl"].origin.module == "hybridize.plugins.scorers.kl"
    assert reg["mse"].origin.distribution == "hybridize"
    assert make(pm, "scorer", "kl").requires == "probe"
    assert make(pm, "scorer", "mse").requires == "stage1"


@pytest.fixture(scope="module")
def real_context():
    """Every ScoreContext field, from a tiny teacher: probes, held-out KL, stage-1 modules and residuals, held-out batches."""
    teacher = tiny_model("llama", n_layer=4, seed=0)
    blocks = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    evaluator = HeldoutEvaluator(teacher, blocks, batch_size=2, chunk=1024, device=torch.device("cpu"))
    evaluator.prepare()  # the unmodified teacher's reference, before any scorer hooks it
    modules = linear_modules(build_student(teacher, [], "gdn", {}))
    probes = {l: build_student(teacher, [l], "gdn", {}) for l in range(4)}
    spent = Counter()

    @torch.no_grad()
    def residuals():
        return {i: float(v) for i, v in alignment_losses(teacher, modules, blocks).items()}

    def make_ctx(layers):
        return ScoreContext(layers=layers, probes=probes, heldout_kl=lambda m: evaluator(m)["heldout_kl"], stage1_residuals=residuals,
                            teacher=teacher, stage1_modules=modules, heldout=evaluator.batches, device=torch.device("cpu"),
                            spend=lambda kind, n: spent.update({kind: n}))

    return make_ctx, teacher, spent


@pytest.mark.parametrize("name", SCORERS, ids=SCORERS)
def test_scorer_contract(pm, name, real_context):
    make_ctx, teacher, _ = real_context
    scorer = make(pm, "scorer", name)
    assert scorer.requires in ("probe", "stage1", "teacher")
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    raw = scorer(make_ctx([1, 3]))
    assert sorted(raw) == [1, 3]
    assert all(isinstance(v, float) and math.isfinite(v) for v in raw.values())
    assert scorer(make_ctx([1, 3])) == raw  # deterministic
    after = teacher.state_dict()  # and the teacher is left as it was
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert teacher.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks for m in teacher.modules())


def test_kl_scores_each_requested_probe_once(pm):
    ctx, calls = probe_context({0: 0.5, 1: 0.25, 2: 0.75, 3: 0.125}, layers=[0, 2, 3])  # one probe group
    assert make(pm, "scorer", "kl")(ctx) == {0: 0.5, 2: 0.75, 3: 0.125}
    assert [m.kl for m in calls] == [0.5, 0.75, 0.125]


def test_kl_errors(pm):
    scorer = make(pm, "scorer", "kl")
    with pytest.raises(HybridizeError, match="scorer 'kl' needs score context field\\(s\\) 'probes', 'heldout_kl'; got None"):
        scorer(ScoreContext(layers=[0, 1]))
    ctx, _ = probe_context({0: 0.1, 1: 0.2})
    ctx.heldout_kl = None
    with pytest.raises(HybridizeError, match="'heldout_kl'; got None. It scores probe results"):
        scorer(ctx)
    ctx, _ = probe_context({0: 0.1, 1: 0.2}, layers=[0, 1, 2])
    with pytest.raises(HybridizeError, match=r"scorer 'kl' has no probe for layers \[2\]"):
        scorer(ctx)


def test_mse_restricts_residuals_to_layers(pm):
    ctx, calls = stage1_context({0: 0.1, 1: 0.9, 2: 0.3}, layers=[0, 2])
    assert make(pm, "scorer", "mse")(ctx) == {0: 0.1, 2: 0.3}
    assert calls == [1]


def test_mse_errors(pm):
    scorer = make(pm, "scorer", "mse")
    with pytest.raises(HybridizeError, match="scorer 'mse' needs score context field\\(s\\) 'stage1_residuals'; got None"):
        scorer(ScoreContext(layers=[0]))
    ctx, _ = stage1_context({0: 0.1, 1: 0.9}, layers=[0, 1, 4])
    with pytest.raises(HybridizeError, match=r"scorer 'mse' has no stage-1 residual for layers \[4\]"):
        scorer(ctx)


def test_default_scorers_feed_their_selectors(pm):
    add = make(pm, "selector", "kl-greedy-add", seed=0)
    kl = make(pm, "scorer", add.default_scorer)
    ctx, _ = probe_context({p.layer: [0.9, 0.2, 0.6, 0.4][p.layer] for p in add.plan(4)})
    assert rank(add.importance(kl(ctx), 4, 2))[:2] == [1, 3]
    mse_sel = make(pm, "selector", "mse-greedy-add", seed=0)
    mse = make(pm, "scorer", mse_sel.default_scorer)
    ctx, _ = stage1_context({0: 0.9, 1: 0.2, 2: 0.6, 3: 0.4})
    assert rank(mse_sel.importance(mse(ctx), 4, 2))[:2] == [0, 2]


def test_scorer_config_rejects_unknown_keys(pm):
    with pytest.raises(ConfigError, match="scorer 'kl' has no field 'temperature'"):
        pm.registry("scorer")["kl"].build_config({"temperature": 2.0})
