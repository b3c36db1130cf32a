"""The memory plan (hybridize.recipes.plan): meta-device parameter counts, probe_group_size auto, the refusal
before OUT is written, and `hybridize run --dry-run` (prints the plan, builds and writes nothing)."""
from __future__ import annotations

import functools
import json

import pytest
import yaml

from hybridize.errors import ConfigError
from tests.conftest import base

GIB = 1024 ** 3


def probe_cfg(files, **selection):
    cfg = base(files)
    cfg["selection"] = {"selector": "kl-greedy-add", "stop": "fixed-budget", "probe_tokens": 64, **selection}
    return cfg


def run_config(tree, pm):
    from hybridize.recipes.runconfig import run_config_from_dict

    return run_config_from_dict(tree, pm=pm)


@pytest.mark.parametrize("policy", ["all", "mixers", "probed"])
def test_counts_match_a_built_student(files, pm, policy):
    from hybridize.model.surgery import build_student
    from hybridize.model.teacher import load_teacher
    from hybridize.recipes.plan import count_params, teacher_config
    from hybridize.registry.configs import ComponentRef
    from hybridize.selection.probes import trains

    counts = count_params(teacher_config(str(files / "teacher")), ComponentRef(name="gdn"), pm)
    teacher = load_teacher(str(files / "teacher"), device="cpu")
    assert counts.teacher == sum(p.numel() for p in teacher.model.parameters())
    for layer in (0, 2):
        student = build_student(teacher.model, [layer], "gdn", pm=pm)
        owned = sum(p.numel() for n, p in student.named_parameters() if trains(policy, layer)(n))
        assert counts.probe_params(policy, layer) == owned, (policy, layer)


def test_auto_group_shrinks_with_the_gpu(files, pm):
    from hybridize.recipes.plan import plan_run

    cfg = with_policy(run_config(probe_cfg(files), pm), "all")  # a probe the size of the student: stage 2 fits too
    whole = plan_run(cfg, pm, gpu_bytes=GIB, device="cpu")
    assert whole.n_probes == 4 and whole.group_size == 4
    one = whole.memory["probes_gpu"] // whole.group_size
    fixed = whole.memory["selection_total"] - whole.memory["probes_gpu"]
    gpu = int((fixed + 2 * one) / 0.9) + 1  # room for two probes, not three
    small = plan_run(cfg, pm, gpu_bytes=gpu, device="cpu")
    assert small.group_size == 2
    assert small.memory["host"] == 2 * one // 4 * 3 > 0  # two probes wait off the GPU (state = 3/4 of param+state+grad)
    assert plan_run(cfg, pm, device="cpu").group_size == 4  # no GPU memory known: all at once
    assert plan_run(cfg, pm, nproc=2, gpu_bytes=GIB, device="cpu").probes_per_rank == 2


def with_policy(cfg, policy):
    import attrs

    return attrs.evolve(cfg, selection=attrs.evolve(cfg.selection, probe_trainable=policy))


def test_policy_shrinks_what_a_probe_owns(files, pm):
    from hybridize.recipes.plan import plan_run

    cfg = run_config(probe_cfg(files), pm)
    plans = {policy: plan_run(with_policy(cfg, policy), pm, gpu_bytes=GIB, device="cpu") for policy in ("all", "mixers", "probed")}
    assert plans["all"].probe_params > plans["mixers"].probe_params > plans["probed"].probe_params > 0
    assert plans["all"].memory["disk"] > plans["probed"].memory["disk"]
    assert plans["all"].memory["teacher"] == plans["probed"].memory["teacher"]


def test_impossible_config_is_refused_before_out(files, pm, tmp_path, monkeypatch, capsys):
    from hybridize.cli import main
    from hybridize.recipes import plan

    cfg = run_config(probe_cfg(files), pm)
    with pytest.raises(ConfigError) as exc:
        plan.plan_run(cfg, pm, gpu_bytes=1000, device="cpu")
    message = str(exc.value)
    assert "\n" not in message.strip() and "GiB" in message
    assert "selection.probe_trainable" in message or "distill.micro_batch_size" in message
    one_at_a_time = run_config(probe_cfg(files, probe_group_size=1, probe_offload="host"), pm)
    with pytest.raises(ConfigError, match="host memory"):
        plan.plan_run(one_at_a_time, pm, gpu_bytes=GIB, host_bytes=1, device="cpu")
    with pytest.raises(ConfigError, match="disk"):
        plan.plan_run(cfg, pm, gpu_bytes=GIB, disk_bytes=1, device="cpu")
    monkeypatch.setattr(plan, "plan_run", functools.partial(plan.plan_run, gpu_bytes=1000))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(probe_cfg(files)))
    code = main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "GiB" in err and "selection.probe_trainable" in err
    assert not (tmp_path / "out").exists()


def test_explicit_group_too_big_names_the_group_size(files, pm):
    from hybridize.recipes.plan import plan_run

    cfg = run_config(probe_cfg(files, probe_group_size=4), pm)
    whole = plan_run(cfg, pm, gpu_bytes=GIB, device="cpu")
    one = whole.memory["probes_gpu"] // 4
    gpu = int((whole.memory["gpu_total"] - 2 * one) / 0.9)
    with pytest.raises(ConfigError, match="selection.probe_group_size 4 needs"):
        plan_run(cfg, pm, gpu_bytes=gpu, device="cpu")


def test_dry_run_prints_the_plan_and_writes_nothing(files, tmp_path, monkeypatch, capsys):
    import hybridize.model.teacher as teacher_mod
    import hybridize.model.surgery as surgery
    from hybridize.cli import main

    def boom(*args, **kwargs):
        raise AssertionError("--dry-run must build nothing")

    monkeypatch.setattr(teacher_mod, "load_teacher", boom)
    monkeypatch.setattr(surgery, "build_student", boom)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(probe_cfg(files)))
    (tmp_path / "tps.json").write_text(json.dumps({"stage1": 1000, "probes": 500, "stage2": 1000, "stage3": 1000}))
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet", "--dry-run",
                 "--throughput", str(tmp_path / "tps.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for word in ("teacher", "stage-1 modules", "probes on GPU", "activations", "final stage 2", "peak", "host", "disk", "probes",
                 "stage2", "stage3", "estimated time"):
        assert word in printed
    assert "unknown (pass" not in printed and " h (" in printed
    assert not out.exists()
    code = main(["run", str(tmp_path / "run.yaml"), "--out", str(out), "--quiet", "--dry-run"])
    assert code == 0 and "estimated time               unknown" in capsys.readouterr().out
    assert not out.exists()


def test_group_size_config_values(files, pm):
    cfg = run_config(probe_cfg(files), pm)
    assert cfg.selection.probe_group_size == "auto"
    assert run_config(probe_cfg(files, probe_group_size=0), pm).selection.probe_group_size == 0
    assert run_config(probe_cfg(files, probe_group_size=3), pm).selection.probe_group_size == 3
    for bad in (-1, "big", 1.5):
        with pytest.raises(ConfigError, match="probe_group_size"):
            run_config(probe_cfg(files, probe_group_size=bad), pm)


def test_recipe_resolves_auto_to_an_int(files, pm):
    from hybridize.recipes.steps import resolved_selection

    cfg = run_config(probe_cfg(files), pm)
    assert resolved_selection(cfg, pm, "cpu").probe_group_size == 4
    resolved = resolved_selection(cfg, pm, "cpu")
    assert resolved.probe_group_size == 4 and resolved.probe_offload == "host"
    cfg = run_config(probe_cfg(files, probe_group_size=2, probe_offload="disk"), pm)
    assert resolved_selection(cfg, pm, "cpu") is cfg.selection  # nothing left to resolve


def test_the_final_stage_2_is_planned_and_refused_with_its_fields(files, pm):
    from hybridize.recipes.plan import plan_run

    tree = probe_cfg(files)
    tree["distill"] = {**tree.get("distill", {}), "stage2_tokens": 4096}
    cfg = run_config(tree, pm)
    plan = plan_run(cfg, pm, gpu_bytes=GIB, device="cpu")
    m = plan.memory
    assert m["stage2"] > m["teacher"] + m["activations"] and m["gpu_total"] == max(m["stage2"], m["selection_total"])
    student_state = m["stage2"] - m["teacher"] - m["activations"]
    assert m["disk"] >= student_state  # the stage-2 checkpoint: parameters and AdamW (gradients are not saved)
    listed = run_config({**tree, "softmax_layers": [1]}, pm)  # nothing selected: only the final stage 2 needs the GPU
    fixed = plan_run(listed, pm, gpu_bytes=GIB, device="cpu")
    assert fixed.n_probes == 0 and fixed.memory["selection_total"] == 0 and fixed.memory["stage2"] > 0
    with pytest.raises(ConfigError, match="final hybrid's stage 2 needs .* distill.micro_batch_size"):
        plan_run(listed, pm, gpu_bytes=fixed.memory["stage2"] - 1, device="cpu")


def test_waiting_probes_go_to_disk_when_the_host_is_short(files, pm):
    import attrs

    from hybridize.recipes.plan import plan_run

    cfg = run_config(probe_cfg(files, probe_group_size=1), pm)
    roomy = plan_run(cfg, pm, gpu_bytes=GIB, device="cpu")
    assert roomy.offload == "host" and roomy.memory["host"] > 0
    short = plan_run(cfg, pm, gpu_bytes=GIB, host_bytes=1, device="cpu")
    assert short.offload == "disk" and short.memory["host"] == 0
    assert short.memory["disk"] == roomy.memory["disk"] + roomy.memory["host"]
    host_only = attrs.evolve(cfg, selection=attrs.evolve(cfg.selection, probe_offload="host"))
    with pytest.raises(ConfigError, match="host memory .* selection.probe_offload: disk"):
        plan_run(host_only, pm, gpu_bytes=GIB, host_bytes=1, device="cpu")
