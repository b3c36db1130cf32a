"""The probe memory model: probes share what they do not train, own what they train, and move / save only that."""
from __future__ import annotations

import pytest
import torch

from hybridize.distill.stages import linear_modules
from hybridize.errors import ConfigError, HybridizeError
from hybridize.model.surgery import build_student
from hybridize.registry.configs import ComponentRef
from hybridize.registry.manager import get_plugin_manager
from hybridize.selection.components import PROBE_TRAINABLE, SelectionConfig
from hybridize.selection.contract import Probe
from hybridize.selection.engine import SelectionEngine
from hybridize.selection.probes import ProbeBuilder, ProbeRun
from hybridize.testing.models import tiny_model

from test_selection import DISTILL, Crash, data, corpus  # noqa: F401  (fixtures)


def builder(teacher, trainable: str) -> ProbeBuilder:
    pm = get_plugin_manager()
    stage1 = {i: m.requires_grad_(False) for i, m in linear_modules(build_student(teacher, [], "gdn", pm=pm)).items()}
    return ProbeBuilder(teacher=teacher, stage1_modules=stage1, variant=ComponentRef(name="gdn"), pm=pm, distill=DISTILL,
                        lr_attn=1e-3, lr_other=1e-3, device=torch.device("cpu"), trainable=trainable)


def sources(b: ProbeBuilder) -> dict[int, torch.Tensor]:
    """data_ptr -> tensor of every teacher and stage-1 parameter (what a probe may share)."""
    shared = [*b.teacher.parameters(), *(p for m in b.stage1_modules.values() for p in m.parameters())]
    return {t.data_ptr(): t for t in shared}


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def teacher(request):
    return tiny_model("llama", n_layer=4, seed=1, tie_word_embeddings=request.param)


@pytest.mark.parametrize("trainable", PROBE_TRAINABLE)
def test_probes_share_untrained_tensors_by_identity(teacher, trainable):
    b = builder(teacher, trainable)
    run = b.build(Probe(layer=2, softmax_layers=(2,)), steps=4)
    shared = sources(b)
    owned = set(run.owned)
    assert owned, "a probe trains something"
    for name, p in run.model.named_parameters():
        if name in owned:
            assert p.requires_grad and p.data_ptr() not in shared, f"{name} must be the probe's own copy"
        else:
            assert not p.requires_grad and p.data_ptr() in shared, f"{name} must be the teacher's / stage 1's tensor"
    expected = {"all": lambda n: True, "mixers": lambda n: ".self_attn." in n,
                "probed": lambda n: n.startswith("model.layers.2.self_attn.")}[trainable]
    assert owned == {n for n, _ in run.model.named_parameters() if expected(n)}
    assert (run.model.lm_head.weight is run.model.model.embed_tokens.weight) == teacher.config.tie_word_embeddings
    # two probes of the same layer own different tensors and share the rest
    other = b.build(Probe(layer=2, softmax_layers=(2,)), steps=4)
    mine = dict(run.model.named_parameters())
    for name, p in other.model.named_parameters():
        assert (p.data_ptr() == mine[name].data_ptr()) == (name not in owned), name


@pytest.mark.parametrize("trainable", ["mixers", "probed"])
def test_only_owned_tensors_and_their_optimizer_state_leave_the_device(teacher, trainable, monkeypatch):
    b = builder(teacher, trainable)
    run = b.build(Probe(layer=1, softmax_layers=(1,)), steps=4)
    ids = torch.randint(0, 64, (2, 16))
    run.train_step([ids], [teacher.model(input_ids=ids).last_hidden_state], teacher, DISTILL, torch.device("cpu"))
    moved = []

    def move(t, device, *, pin=False):  # a CPU stand-in for a GPU <-> pinned host move: new storage, recorded
        moved.append(t.data_ptr())
        return t.clone()

    monkeypatch.setattr("hybridize.selection.probes.move_tensor", move)
    monkeypatch.setattr("hybridize.training.loop.move_tensor", move)
    states = [v for s in run.optimizer.state.values() for k, v in s.items() if k != "step"]
    params = dict(run.model.named_parameters())
    compact = {params[n].data_ptr() for n in run.owned} | {v.data_ptr() for v in states}
    before = {n: p.data_ptr() for n, p in params.items()}
    run.to(torch.device("cuda"))
    assert set(moved) == compact and len(moved) == 3 * len(run.owned)  # parameters + AdamW's two moments
    for name, p in run.model.named_parameters():
        assert (p.data_ptr() != before[name]) == (name in run.owned), name
    assert set(run.state_dict()["model"]) == set(run.owned)


def test_a_probe_trains_only_what_it_owns(teacher):
    b = builder(teacher, "probed")
    run = b.build(Probe(layer=3, softmax_layers=(3,)), steps=4)
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        h = teacher.model(input_ids=ids).last_hidden_state
    for _ in range(2):
        run.train_step([ids], [h], teacher, DISTILL, torch.device("cpu"))
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, start[n])}
    assert changed and changed <= set(run.owned)
    assert all(n.startswith("model.layers.3.self_attn.") for n in run.owned)


def engine(teacher, data, trainable, *, ckpt=None, group=0, on_window=None, probe_tokens=1536):
    cfg = SelectionConfig(selector=ComponentRef(name="kl-greedy-add"), stop=ComponentRef(name="fixed-budget"),
                          probe_tokens=probe_tokens, eval_every=1, probe_trainable=trainable, probe_group_size=group)
    return SelectionEngine(teacher=teacher, data=data, cfg=cfg, distill=DISTILL, variant=ComponentRef(name="gdn"),
                           pm=get_plugin_manager(), device=torch.device("cpu"), k=1, ckpt_dir=ckpt, progress=False,
                           on_window=on_window)


@pytest.mark.parametrize("trainable", ["mixers", "probed"])
def test_resume_from_compact_checkpoints_equals_an_uninterrupted_run(tmp_path, data, trainable):  # noqa: F811
    teacher = tiny_model("llama", n_layer=3)
    ref = engine(teacher, data, trainable, ckpt=tmp_path / "a", group=1).run()

    def crash(window):
        if window["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        engine(teacher, data, trainable, ckpt=tmp_path / "b", group=1, on_window=crash).run()
    saved = torch.load(next((tmp_path / "b").rglob("*.pt")), map_location="cpu", weights_only=True)
    for layer, state in saved["probes"].items():
        names = set(state["model"])
        assert names and all(".self_attn." in n for n in names)
        if trainable == "probed":
            assert all(n.startswith(f"model.layers.{layer}.self_attn.") for n in names)
    resumed = engine(teacher, data, trainable, ckpt=tmp_path / "b", group=1).run()
    assert resumed["trajectory"] == ref["trajectory"] and resumed["scores"] == ref["scores"]
    together = engine(teacher, data, trainable).run()  # one group on the device gives the same scores as groups of one
    assert together["trajectory"] == ref["trajectory"]


def test_resume_with_another_probe_trainable_is_refused(tmp_path, data):  # noqa: F811
    teacher = tiny_model("llama", n_layer=3)
    with pytest.raises(Crash):
        engine(teacher, data, "probed", ckpt=tmp_path / "c", on_window=lambda w: (_ for _ in ()).throw(Crash)).run()
    with pytest.raises(HybridizeError, match="selection.probe_trainable"):
        engine(teacher, data, "mixers", ckpt=tmp_path / "c").run()


def test_probe_trainable_is_validated():
    with pytest.raises((ConfigError, ValueError), match="probe_trainable"):
        SelectionConfig(probe_trainable="attention")


def test_probes_waiting_on_disk_give_the_same_scores(tmp_path, data, monkeypatch):  # noqa: F811
    teacher = tiny_model("llama", n_layer=3)
    ref = engine(teacher, data, "mixers", group=1).run()
    e = engine(teacher, data, "mixers", ckpt=tmp_path / "ck", group=1)
    e.cfg = SelectionConfig(**{**{a: getattr(e.cfg, a) for a in ("selector", "stop", "probe_tokens", "eval_every",
                                                                  "probe_trainable", "probe_group_size")},
                               "probe_offload": "disk"})
    seen = []
    unpark = ProbeRun.unpark

    def spy(run, device):  # while a probe waits on disk it holds no owned tensor in memory
        seen.append((run.parked.exists(), all(p.numel() == 0 for p in run.owned_params().values()),
                     len(run.optimizer.state)))
        unpark(run, device)

    monkeypatch.setattr(ProbeRun, "unpark", spy)
    parked = e.run()
    assert parked["trajectory"] == ref["trajectory"] and parked["scores"] == ref["scores"]
    assert seen and all(seen_ok and empty and n_state == 0 for seen_ok, empty, n_state in seen)
    assert not (tmp_path / "ck" / "parked").exists()  # the scratch files go when the selection ends


def test_owned_copies_of_16_bit_weights_are_fp32_masters_under_autocast():
    from hybridize.selection.probes import own_parameters

    model = tiny_model("llama", n_layer=2).to(torch.bfloat16)
    names = own_parameters(model, lambda n: n.startswith("model.layers.1.self_attn."), fp32_master=True)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert names and all(dtypes[n] == torch.float32 for n in names)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in names)  # shared tensors keep theirs
    p = torch.full((4,), 0.02, dtype=torch.bfloat16)  # why: a bf16 weight does not move at the probes' 7e-6
    assert torch.equal(p - 7e-6, p) and not torch.equal(p.float() - 7e-6, p.float())
    plain = tiny_model("llama", n_layer=2).to(torch.bfloat16)
    kept = own_parameters(plain, lambda n: n.startswith("model.layers.1.self_attn."))  # CPU: no autocast, dtype kept
    assert all(p.dtype == torch.bfloat16 for n, p in plain.named_parameters() if n in kept)
