"""Manifests of hashes (saved hybrids, checkpoints, run dirs), atomic saves, non-finite losses, fault-injection specs."""
from __future__ import annotations

import json
import re

import pytest
import torch

from hybridize import faults
from hybridize.errors import ConfigError
from hybridize.atomic_io import MANIFEST, IntegrityError, record_checkpoint, verify_manifest, write_manifest
from hybridize.model.hybrid import load_hybrid, save_hybrid
from hybridize.model.surgery import build_student
from hybridize.testing.models import tiny_model, tiny_tokenizer
from hybridize.atomic_io import atomic_torch_save
from hybridize.training.checkpoints import load_checkpoint
from hybridize.training.loop import Loop, LoopConfig, NonFiniteLossError

FIX = "save it again with hybridize.save_hybrid (or rerun the run with --resume)"


@pytest.fixture
def saved(tmp_path):
    student = build_student(tiny_model("llama", n_layer=2), [0], "gdn").eval()
    return save_hybrid(student, tmp_path / "m", tiny_tokenizer())


def test_save_hybrid_writes_a_manifest_of_every_file_last(saved):
    files = json.loads((saved / MANIFEST).read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert set(files) == {p.name for p in saved.iterdir()} - {MANIFEST}
    assert not list(saved.parent.glob(".m.*"))  # the temporary directory was renamed, not copied
    verify_manifest(saved)


def test_a_truncated_weight_file_is_refused_by_name(saved):
    weights = saved / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(IntegrityError) as exc:
        load_hybrid(saved)
    assert re.fullmatch(
        rf"saved hybrid '{re.escape(str(saved))}' is damaged: file 'model.safetensors' has {size // 2} bytes and sha256 "
        rf"[0-9a-f]{{12}}\.\.\., but {MANIFEST} records {size} bytes and sha256 [0-9a-f]{{12}}\.\.\.; {re.escape(FIX)}",
        str(exc.value),
    ), str(exc.value)


def test_a_missing_file_is_refused_by_name(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError) as exc:
        load_hybrid(saved)
    assert str(exc.value) == (
        f"saved hybrid {str(saved)!r} is incomplete: file 'tokenizer.json' listed in {MANIFEST} is missing; {FIX}"
    )


def test_a_hybrid_without_manifest_is_refused(saved):
    (saved / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=re.escape(f"has no {MANIFEST}: its save did not finish")):
        load_hybrid(saved)


def test_save_hybrid_replaces_an_old_hybrid_and_clears_a_stale_temporary(saved):
    stale = saved.with_name(".m.tmp")
    stale.mkdir()
    (stale / "junk.bin").write_text("half of an old save")
    student = build_student(tiny_model("llama", n_layer=2, seed=5), [1], "gdn")
    save_hybrid(student, saved, tiny_tokenizer())
    assert load_hybrid(saved).config.hybridize["softmax_layers"] == [1]
    assert not stale.exists() and not (saved / "junk.bin").exists()


def test_write_manifest_skips_excluded_and_hidden_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "a.pt").write_bytes(b"x")
    (tmp_path / ".result.json.tmp").write_text("{")
    (tmp_path / "result.json").write_text("{}")
    write_manifest(tmp_path, exclude=("checkpoints",))
    assert list(json.loads((tmp_path / MANIFEST).read_text())["files"]) == ["result.json"]


# -- checkpoints ------------------------------------------------------------------------------------
def small_loop(tmp_path, loss_fn=None, steps=4):
    model = torch.nn.Linear(3, 1)
    blocks = torch.randn(8, 3)
    cfg = LoopConfig(steps=steps, batch_size=2, micro_batch_size=2, lr=0.1, checkpoint_every=2)
    return Loop(name="t", model=model, param_groups=[{"params": list(model.parameters())}],
                loss_fn=loss_fn or (lambda b: model(b).pow(2).mean()), blocks=blocks, cfg=cfg, device=torch.device("cpu"),
                ckpt_path=tmp_path / "t.pt", progress=False)


def test_a_damaged_checkpoint_is_refused_on_resume(tmp_path):
    small_loop(tmp_path).run()
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(IntegrityError) as exc:
        small_loop(tmp_path).try_resume()
    msg = str(exc.value)
    assert msg.startswith(f"checkpoint directory {str(tmp_path)!r} is damaged: file 't.pt' has ")
    assert msg.endswith("delete that file to redo its stage, or start again with --overwrite")


def test_a_checkpoint_without_a_record_is_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "t.pt")
    with pytest.raises(IntegrityError) as exc:
        small_loop(tmp_path).try_resume()
    assert str(exc.value) == (
        f"checkpoint {str(tmp_path / 't.pt')!r} has no record in {str(tmp_path / MANIFEST)!r}, so it cannot be trusted; "
        "delete that file to redo its stage, or start again with --overwrite"
    )


def test_a_kill_between_record_and_rename_leaves_a_valid_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"step": 1}, path)
    tmp = tmp_path / ".c.pt.tmp1"
    torch.save({"step": 2}, tmp)
    record_checkpoint(path, tmp)  # ... and killed before the rename
    assert load_checkpoint(path)["step"] == 1
    atomic_torch_save({"step": 3}, path)
    assert load_checkpoint(path)["step"] == 3 and not list(tmp_path.glob(".c.pt.tmp*"))
    assert json.loads((tmp_path / MANIFEST).read_text())["files"]["c.pt"].keys() == {"sha256", "bytes"}


def test_an_unloadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"step": 1}, path)
    path.write_bytes(b"not a torch file")
    write_manifest(tmp_path)  # even with a matching hash
    with pytest.raises(IntegrityError, match=re.escape(f"checkpoint {str(path)!r} cannot be loaded (")):
        load_checkpoint(path)


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path):
    calls = []

    def loss_fn(b):
        calls.append(1)
        out = loop.model(b).pow(2).mean()
        return out * float("nan") if len(calls) == 3 else out

    loop = small_loop(tmp_path, loss_fn)
    with pytest.raises(NonFiniteLossError) as exc:
        loop.run()
    assert str(exc.value) == (
        "t: the training loss is nan at step 3 (lr 0.055); the step was not applied. Lower the learning rate, then "
        "--resume continues from the last checkpoint"
    )
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
    assert load_checkpoint(tmp_path / "t.pt")["step"] == 2


# -- fault-injection specs ------------------------------------------------------------------------------
def test_fault_specs_fire_on_the_nth_arrival(monkeypatch):
    monkeypatch.setenv(faults.ENV, "probe-step:2, probe-nan@1:2+")
    assert [faults.fires("probe-step") for _ in range(3)] == [False, True, False]
    assert [faults.fires("probe-nan", 1) for _ in range(3)] == [False, True, True]
    assert not faults.fires("probe-nan", 0) and not faults.fires("stage1-step")


def test_a_bad_fault_spec_is_an_error(monkeypatch):
    monkeypatch.setenv(faults.ENV, "stage9-step:1")
    with pytest.raises(ConfigError) as exc:
        faults.fires("stage1-step")
    assert str(exc.value) == (
        f"HYBRIDIZE_FAULT item 'stage9-step:1' must look like POINT[@KEY]:N or POINT[@KEY]:N+ with N >= 1 and POINT one "
        f"of {', '.join(faults.POINTS)}"
    )


def test_no_fault_spec_is_free(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert not faults.fires("save-model")
    faults.kill_point("save-model")  # still alive
