"""Issue 17 part A: recoveries that work. `--resume` takes the changes that cannot invalidate finished
work and refuses the others and another teacher; a full disk and Ctrl-C are one line each, and doing
what the line says (lower the lr / free space / the printed --resume command) finishes the run.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shlex

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hybridize import faults
from hybridize.cli import main
from hybridize.testing.models import save_tiny_teacher

from test_bad_input import one_thread  # noqa: F401 - fixture (tests/unit is on sys.path); `files` is tests/conftest.py's

RESUME_FIX = ("resume with the same config and --set values, or use --overwrite / another --out")
ALLOWED = "only learning rates, evaluators, distill.eval_every / eval_blocks and raised stage budgets can"


def cfg_for(files, **distill):
    """`hybridize distill`, layer 1 softmax; stage 1 2 steps, stage 2 8 steps of 2 blocks x 16 tokens, checkpoints every 2."""
    d = {"stage1_tokens": 64, "stage2_tokens": 256, "batch_size": 2, "checkpoint_every": 2, "eval_every": 4, **distill}
    return {"teacher": str(files / "teacher"), "data": {"train": str(files / "corpus.txt"), "seq_len": 16},
            "softmax_layers": [1], "device": "cpu", "distill": d}


def distill(tmp_path, cfg, capsys, *extra, out="out", name="run.yaml"):
    (tmp_path / name).write_text(yaml.safe_dump(cfg))
    argv = ["distill", str(tmp_path / name), "--out", str(tmp_path / out), "--quiet", *extra]
    code = main(argv)
    return code, capsys.readouterr().err, argv


def last_line(err):
    return err.rstrip("\n").split("\n")[-1]


def stage2_lrs_after_resume(out):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    start = max(i for i, l in enumerate(lines) if l.get("event") == "resume")
    return [l["lr"] for l in lines[start:] if l.get("stage") == "stage2"]


def test_nan_stop_then_lower_lr_and_resume_finishes(files, tmp_path, capsys):
    """The NaN message says 'Lower the learning rate, then --resume continues from the last checkpoint': do exactly that."""
    code, err, _ = distill(tmp_path, cfg_for(files, stage2_lr_attn=1e5, stage2_lr_other=1e5), capsys)
    assert code == 2
    assert last_line(err) == ("hybridize: error: stage2: the training loss is nan at step 2 (lr 9.66e+04); the step was not "
                              "applied. Lower the learning rate, then --resume continues from the last checkpoint")
    code, err, _ = distill(tmp_path, cfg_for(files, stage2_lr_attn=1e-3, stage2_lr_other=1e-5), capsys, "--resume")
    assert code == 0, err
    assert (f"hybridize: --resume of {str(tmp_path / 'out')!r} continues with changed settings: distill.stage2_lr_attn: "
            "100000.0 -> 0.001; distill.stage2_lr_other: 100000.0 -> 1e-05\n") in err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["config"]["distill"]["stage2_lr_attn"] == 1e-3 and result["tokens"]["stage2"] == 256
    assert all(lr <= 1e-3 for lr in stage2_lrs_after_resume(tmp_path / "out"))


def interrupt_at(monkeypatch, point, n):
    """Ctrl-C (KeyboardInterrupt) at the n-th arrival at a fault point, the way a user's Ctrl-C lands mid-run."""
    seen = {"n": 0}
    real = faults.kill_point

    def kill_point(name):
        if name == point:
            seen["n"] += 1
            if seen["n"] == n:
                raise KeyboardInterrupt
        real(name)

    monkeypatch.setattr(faults, "kill_point", kill_point)
    return lambda: monkeypatch.setattr(faults, "kill_point", real)


def test_ctrl_c_prints_the_resume_command_which_finishes_bit_for_bit(files, tmp_path, capsys, monkeypatch):
    cfg = cfg_for(files)
    assert distill(tmp_path, cfg, capsys, out="ref")[0] == 0
    restore = interrupt_at(monkeypatch, "stage2-step", 5)  # after step 5; the checkpoint of step 4 is on disk
    code, err, argv = distill(tmp_path, cfg, capsys)
    assert code == 130
    command = shlex.join(["hybridize", *argv, "--resume"])
    assert err.endswith(f"hybridize: interrupted (Ctrl-C); the checkpoints in {str(tmp_path / 'out')!r} are kept: continue "
                        f"with `{command}`\n")
    restore()
    assert main(shlex.split(command)[1:]) == 0  # exactly the printed command
    a, b = load_file(tmp_path / "out" / "model" / "model.safetensors"), load_file(tmp_path / "ref" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_stage_with_a_lower_lr_uses_it_on_the_same_schedule(files, tmp_path, capsys, monkeypatch):
    restore = interrupt_at(monkeypatch, "stage2-step", 5)
    assert distill(tmp_path, cfg_for(files), capsys)[0] == 130
    restore()
    code, err, _ = distill(tmp_path, cfg_for(files, stage2_lr_attn=1e-5), capsys, "--resume")
    assert code == 0, err
    lrs = stage2_lrs_after_resume(tmp_path / "out")  # steps 5..8 (resumed from the step-4 checkpoint): 0.1x the old lr
    ref = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(lrs) == 4 and ref["config"]["distill"]["stage2_lr_attn"] == 1e-5
    lines = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    before = [l["lr"] for l in lines[: [l.get("event") for l in lines].index("resume")] if l.get("stage") == "stage2"]
    assert len(before) == 5 and lrs[0] == pytest.approx(before[4] / 10, rel=1e-12)  # step 5 again, at a tenth
    assert lrs[-1] == pytest.approx(0.1 * 1e-5, rel=1e-12)  # the schedule ends at min_lr_ratio x the new peak


def test_resume_accepts_new_evaluators_and_a_raised_budget(files, tmp_path, capsys):
    code, err, _ = distill(tmp_path, cfg_for(files, stage2_tokens=128), capsys)
    assert code == 0, err
    cfg = cfg_for(files, stage2_tokens=256)
    cfg["evaluators"] = [{"name": "perplexity", "data": str(files / "corpus.txt")}]
    code, err, _ = distill(tmp_path, cfg, capsys, "--resume")
    assert code == 0, err
    assert (f"continues with changed settings: distill.stage2_tokens: 128 -> 256; evaluators: [] -> "
            f"[{{'name': 'perplexity', 'data': {str(files / 'corpus.txt')!r}}}]\n") in err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["tokens"]["stage2"] == 256 and any(k.startswith("perplexity") for k in result["metrics"])
    assert json.loads((tmp_path / "out" / "resumes.jsonl").read_text().splitlines()[-1])["changed"]["distill.stage2_tokens"] == [128, 256]


@pytest.mark.parametrize("change, refused", [
    ({"seed": 1}, "seed"),
    ({"distill.stage2_tokens": 128}, "distill.stage2_tokens (lowered from 256 to 128; a budget may only be raised)"),
    ({"distill.stage1_tokens": 128}, "distill.stage1_tokens (a later stage has started: stage2.pt)"),
    ({"data.seq_len": 8}, "data.seq_len"),
    ({"linear_attention": {"name": "gla"}}, "linear_attention.name"),
], ids=["seed", "budget-lowered", "earlier-stage-extended", "seq_len", "variant"])
def test_resume_refuses_changes_that_invalidate_finished_work(files, tmp_path, capsys, change, refused):
    assert distill(tmp_path, cfg_for(files), capsys)[0] == 0
    cfg = copy.deepcopy(cfg_for(files))
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    code, err, _ = distill(tmp_path, cfg, capsys, "--resume")
    out = tmp_path / "out"
    assert code == 2
    assert last_line(err) == (f"hybridize: error: --resume of {str(out)!r} with a different config: {refused} differ(s) from "
                              f"{str(out / 'run-config.json')!r} and cannot change under --resume ({ALLOWED}); {RESUME_FIX}")


def test_resume_refuses_another_teacher_at_the_same_path(files, tmp_path, capsys):
    teacher = save_tiny_teacher(tmp_path / "teacher", n_layer=4)
    cfg = cfg_for(files)
    cfg["teacher"] = str(teacher)
    assert distill(tmp_path, cfg, capsys)[0] == 0
    save_tiny_teacher(teacher, n_layer=4, seed=1)  # same architecture, same file sizes, other weights
    code, err, _ = distill(tmp_path, cfg, capsys, "--resume")
    out = tmp_path / "out"
    assert code == 2
    assert last_line(err) == (f"hybridize: error: --resume of {str(out)!r} refused: the teacher {str(teacher)!r} is not the "
                              f"one this run started with (its model.safetensors changed since {str(out / 'teacher.json')!r} "
                              "recorded it); put the original teacher back at that path, or start again with --overwrite / "
                              "another --out")
    save_tiny_teacher(teacher, n_layer=4, seed=0)  # the original back: the message's fix works
    assert distill(tmp_path, cfg, capsys, "--resume")[0] == 0


def test_disk_full_while_writing_a_checkpoint(files, tmp_path, capsys, monkeypatch):
    """ENOSPC inside torch.save: one line with the path and the space needed, no temporary file; then --resume finishes."""
    import hybridize.training.loop as train

    real_save = train.torch.save

    def full_save(obj, path, *a, **k):
        if str(path).endswith(f".stage2.pt.tmp{os.getpid()}"):
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(train.torch, "save", full_save)
    code, err, argv = distill(tmp_path, cfg_for(files), capsys)
    ckpt = tmp_path / "out" / "checkpoints" / "stage2.pt"
    assert code == 2
    assert re.fullmatch(rf"hybridize: error: no space left on the device writing {re.escape(repr(str(ckpt)))}: it needs about "
                        r"\d+\.\d [KMG]B and \d+(\.\d)? [BKMG]B? ?are free there; free some space \(or choose an --out on "
                        r"another disk\), then --resume continues from the last checkpoint", last_line(err)), err
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(train.torch, "save", real_save)
    code, err, _ = distill(tmp_path, cfg_for(files), capsys, "--resume")
    assert code == 0, err


def test_disk_full_while_writing_result_json(files, tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".result.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, err, _ = distill(tmp_path, cfg_for(files), capsys)
    result = tmp_path / "out" / "result.json"
    assert code == 2
    assert last_line(err).startswith(f"hybridize: error: no space left on the device writing {str(result)!r}: it needs about ")
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name] and not result.exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert distill(tmp_path, cfg_for(files), capsys, "--resume")[0] == 0 and result.is_file()


def test_any_other_os_error_is_one_line(files, tmp_path, capsys, monkeypatch):
    import hybridize.recipes.run as pipeline

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "distill.png"))

    monkeypatch.setattr(pipeline, "plot_distill_curve", denied)
    code, err, argv = distill(tmp_path, cfg_for(files), capsys)
    assert code == 2
    assert last_line(err) == (f"hybridize: error: cannot use {str(tmp_path / 'out' / 'distill.png')!r}: Permission denied; the "
                              f"checkpoints in {str(tmp_path / 'out')!r} are kept: continue with "
                              f"`{shlex.join(['hybridize', *argv, '--resume'])}`")
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
